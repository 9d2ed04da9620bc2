"use strict";
// The labeller page: one leased task at a time; keyboard first, mouse and drag as well.
// State lives in a few variables; every answer posts {next: true} so the following task
// arrives in the same round trip.

const $ = (id) => document.getElementById(id);
let task = null;        // the task on screen (as /api/next returns it)
let shownAt = 0;        // when it appeared, for duration_ms
let busy = false;       // an answer is in flight: ignore keys
let order = [];         // rank: completion index at each position, best first
let ties = [];          // rank: ties[p] = position p is tied with position p - 1
let placed = 0;         // rank: positions fixed so far by number keys
let tieNext = false;    // rank: "=" was pressed, the next number ties with the previous one
let best = null;        // best-of-K: chosen index
let pollTimer = null;
let leaseEnd = 0;       // local clock time (s) the lease runs out; avoids trusting clock sync

function setStatus(text, isError) {
  $("status").textContent = text || "";
  $("status").className = isError ? "error" : "";
}

async function api(method, path, body) {
  const init = {method, credentials: "same-origin", headers: {}};
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  if (r.status === 401) {
    location.href = "/login";
    throw new Error("signed out");
  }
  const data = await r.json().catch(() => ({}));
  if (!r.ok) {
    const err = new Error(data.detail || r.statusText);
    err.status = r.status;
    throw err;
  }
  return data;
}

function project() {
  return $("project").value || null;
}

function showProgress(p) {
  if (p) $("progress").textContent = `answered today: ${p.answered_today} · queue: ${p.queue}`;
}

function mediaElement(item) {
  if (item.text !== undefined) {
    const div = document.createElement("div");
    div.className = "text";
    div.textContent = item.text;
    return div;
  }
  if (item.media_ext === "gif") {
    const img = document.createElement("img");
    img.src = item.media_url;
    img.alt = "clip";
    return img;
  }
  const v = document.createElement("video");
  Object.assign(v, {src: item.media_url, autoplay: true, loop: true, muted: true, playsInline: true});
  v.setAttribute("muted", "");
  return v;
}

function show(next) {
  task = next || null;
  shownAt = performance.now();
  leaseEnd = task ? Date.now() / 1000 + task.lease_seconds : 0;
  $("skip").hidden = !task;
  $("empty").hidden = !!task;
  $("pair").hidden = !task || task.kind !== "pair";
  $("rank").hidden = !task || task.kind !== "rank";
  document.body.dataset.taskId = task ? String(task.id) : "";
  document.body.dataset.mode = task ? task.mode : "";
  clearTimeout(pollTimer);
  if (!task) {
    pollTimer = setTimeout(fetchNext, 5000);
    return;
  }
  if (task.kind === "pair") {
    $("pair-prompt").textContent = task.prompt || "";
    $("pair-prompt").hidden = !task.prompt;
    for (const [side, item] of [["pair-left", task.items[0]], ["pair-right", task.items[1]]]) {
      $(side).replaceChildren(mediaElement(item));
    }
  } else {
    $("rank-prompt").textContent = task.prompt || "";
    order = task.items.map((_, i) => i);
    ties = task.items.map(() => false);
    placed = 0;
    tieNext = false;
    best = null;
    $("rank-help").innerHTML = task.mode === "best"
      ? "Pick the <b>best</b> completion: press its number (or click it), then <kbd>Enter</kbd>."
      : "Press the numbers from <b>best to worst</b>; <kbd>=</kbd> before a number ties it with the " +
        "previous one. Or drag the cards, and use the = buttons for ties. <kbd>Enter</kbd> submits.";
    renderRank();
  }
}

function renderRank() {
  const list = $("rank-list");
  list.replaceChildren();
  const ranks = rankingFromOrder();
  order.forEach((idx, pos) => {
    const li = document.createElement("li");
    li.className = "card" + (pos < placed ? " placed" : "") + (best === idx ? " best" : "");
    li.dataset.index = String(idx);
    li.dataset.pos = String(pos);
    li.draggable = task.mode === "rank";
    const head = document.createElement("div");
    head.className = "card-head";
    const key = document.createElement("kbd");
    key.textContent = String(idx + 1);
    head.append(key);
    if (task.mode === "rank") {
      const rank = document.createElement("span");
      rank.className = "rank";
      rank.textContent = `rank ${ranks[idx] + 1}` + (ties[pos] ? " (tied with above)" : "");
      head.append(rank);
      if (pos > 0) {
        const tie = document.createElement("button");
        tie.type = "button";
        tie.className = "tie" + (ties[pos] ? " on" : "");
        tie.textContent = "= tie with above";
        tie.addEventListener("click", () => { ties[pos] = !ties[pos]; renderRank(); });
        head.append(tie);
      }
    }
    li.append(head, mediaElement(task.items[idx]));
    if (task.mode === "best") li.addEventListener("click", () => { best = idx; renderRank(); });
    li.addEventListener("dragstart", (ev) => ev.dataTransfer.setData("text/plain", String(pos)));
    li.addEventListener("dragover", (ev) => ev.preventDefault());
    li.addEventListener("drop", (ev) => {
      ev.preventDefault();
      const from = Number(ev.dataTransfer.getData("text/plain"));
      const [moved] = order.splice(from, 1);
      order.splice(pos, 0, moved);
      ties = ties.map(() => false);  // ties belong to neighbours; a move breaks them
      renderRank();
    });
    list.append(li);
  });
}

// Rank of each completion (in the order shown to the labeller): 0 best, ties share a rank.
function rankingFromOrder() {
  const ranking = new Array(order.length).fill(0);
  let r = 0;
  order.forEach((idx, pos) => {
    if (pos > 0 && !ties[pos]) r += 1;
    ranking[idx] = r;
  });
  return ranking;
}

function placeByKey(idx) {
  const pos = order.indexOf(idx);
  if (pos < placed) {
    setStatus(`completion ${idx + 1} is already placed; Backspace starts over`);
    return;
  }
  order.splice(pos, 1);
  order.splice(placed, 0, idx);
  ties[placed] = tieNext && placed > 0;
  placed += 1;
  tieNext = false;
  setStatus("");
  renderRank();
}

async function submit(answer) {
  if (!task || busy) return;
  busy = true;
  const id = task.id;
  try {
    const out = await api("POST", `/api/tasks/${id}/answer`, {
      answer,
      duration_ms: Math.round(performance.now() - shownAt),
      next: true,
      project: project(),
    });
    setStatus(`saved answer to task ${id}`);
    document.body.dataset.lastAnswered = String(id);
    showProgress(out.progress);
    show(out.task);
  } catch (err) {
    setStatus(err.message, true);
    if (err.status === 409 || err.status === 404) await fetchNext();
  } finally {
    busy = false;
  }
}

async function fetchNext() {
  try {
    const out = await api("POST", "/api/next", {project: project()});
    showProgress(out.progress);
    show(out.task);
  } catch (err) {
    setStatus(err.message, true);
    clearTimeout(pollTimer);
    pollTimer = setTimeout(fetchNext, 5000);
  }
}

document.addEventListener("keydown", (ev) => {
  if (!task || busy || ev.ctrlKey || ev.metaKey || ev.altKey || ev.target.tagName === "SELECT") return;
  if (task.kind === "pair") {
    const choice = {ArrowLeft: "left", ArrowRight: "right", ArrowUp: "equal", ArrowDown: "cant_tell"}[ev.key];
    if (choice) {
      ev.preventDefault();
      submit({choice});
    }
    return;
  }
  const digit = Number(ev.key);
  if (Number.isInteger(digit) && digit >= 1 && digit <= task.items.length) {
    ev.preventDefault();
    if (task.mode === "best") {
      best = digit - 1;
      renderRank();
    } else {
      placeByKey(digit - 1);
    }
  } else if (ev.key === "=" && task.mode === "rank") {
    tieNext = placed > 0;
  } else if (ev.key === "Backspace") {
    ev.preventDefault();
    show(task);
  } else if (ev.key === "Enter") {
    ev.preventDefault();
    submitRank();
  }
});

function submitRank() {
  if (task.mode === "best") {
    if (best === null) return setStatus("pick the best completion first (its number or a click)", true);
    return submit({best});
  }
  if (placed > 0 && placed < order.length - 1) {
    return setStatus(`place all completions first (${order.length - placed} left), or drag them`, true);
  }
  submit({ranking: rankingFromOrder()});
}

for (const b of document.querySelectorAll("[data-choice]")) {
  b.addEventListener("click", () => submit({choice: b.dataset.choice}));
}
$("rank-submit").addEventListener("click", submitRank);
$("rank-reset").addEventListener("click", () => show(task));
$("skip").addEventListener("click", async () => {
  if (!task) return;
  await api("POST", `/api/tasks/${task.id}/release`);
  fetchNext();
});
$("logout").addEventListener("click", async () => {
  await api("POST", "/api/logout");
  location.href = "/login";
});
$("project").addEventListener("change", fetchNext);

setInterval(() => {
  if (!task) return ($("lease").textContent = "");
  const left = Math.max(0, Math.round(leaseEnd - Date.now() / 1000));
  $("lease").textContent = left > 0
    ? `reserved for you ${Math.floor(left / 60)}:${String(left % 60).padStart(2, "0")}`
    : "reservation expired: answer anyway, it counts unless someone else took it";
}, 1000);

(async () => {
  const me = await api("GET", "/api/me");
  $("who").textContent = `${me.name} (${me.role})`;
  for (const p of me.projects) {
    const opt = document.createElement("option");
    opt.value = p.name;
    opt.textContent = p.name;
    $("project").append(opt);
  }
  await fetchNext();
  document.body.dataset.ready = "1";
})();
