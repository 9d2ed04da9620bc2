"use strict";
// Admin page of one project: queue, throughput, agreement, export. Refreshes every 5 s.
const $ = (id) => document.getElementById(id);
const FORMATS = ["pairs", "text_pairs", "rankings", "best_of_k", "hf"];

async function get(path) {
  const r = await fetch(path, {credentials: "same-origin"});
  if (r.status === 401) location.href = "/login?next=/admin";
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(data.detail || r.statusText);
  return data;
}

function table(el, header, rows) {
  const thead = document.createElement("tr");
  for (const h of header) {
    const th = document.createElement("th");
    th.textContent = h;
    thead.append(th);
  }
  const trs = rows.map((row) => {
    const tr = document.createElement("tr");
    for (const cell of row) {
      const td = document.createElement("td");
      td.textContent = cell === null || cell === undefined ? "–" : String(cell);
      tr.append(td);
    }
    return tr;
  });
  el.replaceChildren(thead, ...trs);
}

function when(t) {
  return t ? new Date(t * 1000).toLocaleString() : null;
}

async function refresh() {
  const name = $("project").value;
  if (!name) return;
  const enc = encodeURIComponent(name);
  try {
    const s = await get(`/api/projects/${enc}/stats`);
    const q = s.queue;
    table($("queue"), ["open", "leased now", "done", "cancelled"], [[q.open, q.leased, q.done, q.cancelled]]);
    const t = s.throughput;
    table($("throughput"), ["last minute", "last hour", "today (UTC)", "total"],
      [[t.last_minute, t.last_hour, t.today, t.total]]);
    table($("labellers"), ["labeller", "answers", "today", "mean time (s)", "last answer"],
      s.labellers.map((l) => [l.labeller, l.answers, l.today,
        l.mean_duration_ms === null ? null : (l.mean_duration_ms / 1000).toFixed(1), when(l.last_answer_at)]));
    table($("agreement"), ["task mode", "agreement", "labeller pairs", "tasks"],
      Object.entries(s.agreement).map(([mode, a]) =>
        [mode, a.agreement === null ? null : a.agreement.toFixed(3), a.labeller_pairs, a.tasks]));
    $("status").textContent = `updated ${new Date().toLocaleTimeString()}`;
    $("status").className = "";
  } catch (err) {
    $("status").textContent = err.message;
    $("status").className = "error";
  }
  $("exports").replaceChildren(...FORMATS.map((f) => {
    const a = document.createElement("a");
    a.href = `/api/projects/${enc}/export?format=${f}`;
    a.textContent = `${f}.jsonl`;
    a.className = "export";
    return a;
  }));
}

(async () => {
  const me = await get("/api/me");
  $("who").textContent = `${me.name} (${me.role})`;
  const wanted = new URLSearchParams(location.search).get("project");
  for (const p of me.projects) {
    const opt = document.createElement("option");
    opt.value = p.name;
    opt.textContent = `${p.name} (${p.open_tasks} open)`;
    opt.selected = p.name === wanted;
    $("project").append(opt);
  }
  $("project").addEventListener("change", () => {
    history.replaceState(null, "", `/admin?project=${encodeURIComponent($("project").value)}`);
    refresh();
  });
  await refresh();
  document.body.dataset.ready = "1";
  setInterval(refresh, 5000);
})();
