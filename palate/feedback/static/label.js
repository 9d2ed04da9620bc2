"use strict";
// The labeller page: one leased task at a time; keyboard first, mouse, touch and drag as well.
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
let touched = false;    // rank: the labeller ordered something (keys, drag, arrows, ties)
let armed = false;      // rank: Enter on an untouched order asked for a second Enter
let best = null;        // best-of-K: chosen index
let drag = null;        // rank: {idx, pointerId} while a card is dragged
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
  if (!p) return;
  const left = $("queue-left");
  left.dataset.count = String(p.queue);
  left.textContent = p.queue === 1 ? "1 task left" : `${p.queue} tasks left`;
  left.title = "open tasks in your projects, the one on screen included";
  $("answered").textContent = `· answered today: ${p.answered_today}`;
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
    touched = false;
    armed = false;
    best = null;
    drag = null;
    for (const b of document.querySelectorAll("[data-rank-only]")) b.hidden = task.mode !== "rank";
    $("rank-help").innerHTML = task.mode === "best" ? HELP_BEST : HELP_RANK;
    renderRank();
  }
}

const HELP_RANK =
  "<p><b>Order the completions from best to worst.</b></p><ul>" +
  "<li>Keyboard: press the completions' numbers from best to worst (the last one follows by " +
  "itself). <kbd>=</kbd> before a number ties it with the one above. <kbd>Backspace</kbd> undoes " +
  "the last, <kbd>Esc</kbd> starts over, <kbd>C</kbd> says you can't tell, <kbd>Enter</kbd> submits.</li>" +
  "<li>Mouse or touch: drag a card by its <span class=\"handle-icon\">⠿</span> handle, or move it " +
  "with ▲ ▼; \"= tie\" ties a card with the one above it.</li></ul>";
const HELP_BEST =
  "<p><b>Pick the best completion.</b></p><ul>" +
  "<li>Keyboard: press its number, then <kbd>Enter</kbd>; <kbd>C</kbd> says you can't tell.</li>" +
  "<li>Mouse or touch: click or tap it, then Submit.</li></ul>";

function button(text, label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

function renderRank() {
  const list = $("rank-list");
  list.replaceChildren();
  const ranks = rankingFromOrder();
  const k = order.length;
  order.forEach((idx, pos) => {
    const li = document.createElement("li");
    li.className = "card" + (pos < placed ? " placed" : "") + (best === idx ? " best" : "") +
      (drag && drag.idx === idx ? " dragging" : "");
    li.dataset.index = String(idx);
    li.dataset.pos = String(pos);
    const head = document.createElement("div");
    head.className = "card-head";
    if (task.mode === "rank") {
      const handle = document.createElement("span");
      handle.className = "handle";
      handle.textContent = "⠿";
      handle.title = "drag to move";
      handle.setAttribute("aria-hidden", "true");
      handle.addEventListener("pointerdown", (ev) => startDrag(ev, idx));
      head.append(handle);
    }
    const key = document.createElement("kbd");
    key.textContent = String(idx + 1);
    head.append(key);
    if (task.mode === "rank") {
      const rank = document.createElement("span");
      rank.className = "rank";
      rank.textContent = `rank ${ranks[idx] + 1}` + (ties[pos] ? " (tie)" : "");
      const tools = document.createElement("span");
      tools.className = "tools";
      const up = button("▲", `move completion ${idx + 1} up`, () => moveTo(pos, pos - 1));
      const down = button("▼", `move completion ${idx + 1} down`, () => moveTo(pos, pos + 1));
      up.disabled = pos === 0;
      down.disabled = pos === k - 1;
      tools.append(up, down);
      if (pos > 0) {
        const tie = button("= tie", `tie completion ${idx + 1} with the one above`, () => {
          ties[pos] = !ties[pos];
          touched = true;
          renderRank();
        });
        tie.className = "tie" + (ties[pos] ? " on" : "");
        tie.setAttribute("aria-pressed", String(ties[pos]));
        tools.append(tie);
      }
      head.append(rank, tools);
    }
    li.append(head, mediaElement(task.items[idx]));
    if (task.mode === "best") li.addEventListener("click", () => { best = idx; renderRank(); });
    list.append(li);
  });
}

// Move the card at position `from` to `to`: the order shown becomes the ranking. Ties belong
// to neighbours, so a move breaks them; key placement starts again from the top.
function moveTo(from, to) {
  if (to < 0 || to >= order.length || to === from) return;
  const [moved] = order.splice(from, 1);
  order.splice(to, 0, moved);
  ties = ties.map(() => false);
  placed = 0;
  touched = true;
  renderRank();
}

// Drag by pointer events (mouse, pen and touch alike): the list keeps the pointer while a card
// follows it; the card swaps with a neighbour once the pointer passes that neighbour's middle.
function startDrag(ev, idx) {
  ev.preventDefault();
  drag = {idx, pointerId: ev.pointerId, y: ev.clientY};
  $("rank-list").setPointerCapture(ev.pointerId);
  renderRank();
  requestAnimationFrame(autoScroll);
}

function onDragMove(ev) {
  if (!drag || ev.pointerId !== drag.pointerId) return;
  drag.y = ev.clientY;
  const from = order.indexOf(drag.idx);
  const cards = [...$("rank-list").children];
  for (let pos = 0; pos < cards.length; pos++) {
    if (pos === from) continue;
    const box = cards[pos].getBoundingClientRect();
    const mid = box.top + box.height / 2;
    if (pos < from && ev.clientY < mid && ev.clientY >= box.top - 1) return moveTo(from, pos);
    if (pos > from && ev.clientY > mid && ev.clientY <= box.bottom + 1) return moveTo(from, pos);
  }
}

// Long cards on a phone: holding a dragged card near the top or bottom edge scrolls the page.
function autoScroll() {
  if (!drag) return;
  const edge = 48;
  if (drag.y < edge) window.scrollBy(0, -12);
  else if (drag.y > window.innerHeight - edge) window.scrollBy(0, 12);
  requestAnimationFrame(autoScroll);
}

function endDrag(ev) {
  if (!drag || ev.pointerId !== drag.pointerId) return;
  drag = null;
  renderRank();
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
  if (tieNext && pos === order.length - 1 && placed === order.length) {
    // The last completion followed by itself; "=" and its number still tie it with the one above.
    ties[pos] = true;
    tieNext = false;
    setStatus("");
    renderRank();
    return;
  }
  if (pos < placed) {
    setStatus(`completion ${idx + 1} is already placed; Backspace undoes the last, Esc starts over`);
    return;
  }
  order.splice(pos, 1);
  order.splice(placed, 0, idx);
  ties[placed] = tieNext && placed > 0;
  placed += 1;
  tieNext = false;
  touched = true;
  if (placed === order.length - 1) placed = order.length;  // the last one follows by itself
  setStatus("");
  renderRank();
}

function undoPlace() {
  if (placed === 0) return setStatus("nothing placed by keys to undo; Esc starts over");
  if (placed === order.length) {  // the one that followed by itself, and any tie given to it
    placed -= 1;
    ties[placed] = false;
  }
  placed -= 1;
  ties[placed] = false;
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
    if (tieNext) setStatus("the next number ties with the one above");
  } else if (ev.key === "Backspace" && task.mode === "rank") {
    ev.preventDefault();
    undoPlace();
  } else if (ev.key === "Escape") {
    ev.preventDefault();
    show(task);
  } else if (ev.key === "c" || ev.key === "C") {
    ev.preventDefault();
    submit({cant_tell: true});
  } else if (ev.key === "Enter") {
    ev.preventDefault();
    submitRank();
  }
});

function submitRank() {
  if (task.mode === "best") {
    if (best === null) return setStatus("pick the best completion first (its number, a click or a tap)", true);
    return submit({best});
  }
  if (placed > 0 && placed < order.length) {
    return setStatus(`place all completions first (${order.length - placed} left), or drag them`, true);
  }
  if (!touched && !armed) {
    armed = true;
    return setStatus("nothing was moved: press Enter (or Submit) again to submit the order as shown");
  }
  submit({ranking: rankingFromOrder()});
}

for (const b of document.querySelectorAll("[data-choice]")) {
  b.addEventListener("click", () => submit({choice: b.dataset.choice}));
}
$("rank-submit").addEventListener("click", submitRank);
$("rank-reset").addEventListener("click", () => show(task));
$("rank-undo").addEventListener("click", undoPlace);
$("rank-cant").addEventListener("click", () => submit({cant_tell: true}));
$("rank-list").addEventListener("pointermove", onDragMove);
$("rank-list").addEventListener("pointerup", endDrag);
$("rank-list").addEventListener("pointercancel", endDrag);
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
