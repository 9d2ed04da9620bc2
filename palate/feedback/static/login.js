"use strict";
// Exchange the token for an HttpOnly cookie, then go where the user was heading.
document.getElementById("login").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const status = document.getElementById("status");
  const token = document.getElementById("token").value.trim();
  const r = await fetch("/api/login", {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify({token}),
    credentials: "same-origin",
  });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) {
    status.textContent = data.detail || "sign-in failed";
    status.className = "error";
    return;
  }
  const next = new URLSearchParams(location.search).get("next") || "";
  // Only same-site paths: an open redirect would let a link send the user elsewhere after sign-in.
  location.href = next.startsWith("/") && !next.startsWith("//") ? next : "/";
});
