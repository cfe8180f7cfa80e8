// The live view: GET /status about once a second while the tab is visible, drawn beside the chat.
// Everything shown is numbers and fixed words; text fields from the server go in through textContent.
"use strict";

const Live = (() => {
  const byId = (id) => document.getElementById(id);
  const WINDOW_MS = 60_000; // the chart's span
  const PERIOD_MS = 1000;
  let options = null;
  let timer = null;
  let inFlight = false;
  let failures = 0;
  let previous = null; // the last snapshot, to see what changed
  let lastAt = 0;
  const samples = []; // {at, rate}: generated tokens per second
  const events = []; // {at, text}: changes to the cap and the degradation state

  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  }

  function text(id, value) {
    byId(id).textContent = value;
  }

  function width(id, part, whole) {
    byId(id).style.width = (whole > 0 ? Math.min(100, (100 * part) / whole) : 0).toFixed(1) + "%";
  }

  function schedule(ms) {
    clearTimeout(timer);
    timer = null;
    if (document.visibilityState === "visible" && options) timer = setTimeout(poll, ms);
  }

  async function poll() {
    if (inFlight || document.visibilityState !== "visible") return;
    inFlight = true;
    let next = PERIOD_MS;
    try {
      const response = await options.fetchStatus();
      if (response.status === 401) {
        text("live-state", "needs the API key");
        options.onUnauthorized();
        return; // no polling until a key is given (restart)
      }
      if (!response.ok) throw new Error("status " + response.status);
      draw(await response.json());
      failures = 0;
      text("live-state", "● live");
      byId("live-state").className = "ok";
    } catch {
      failures += 1;
      next = Math.min(PERIOD_MS * 2 ** failures, 10_000); // a stopped server is not hammered
      text("live-state", "server unreachable");
      byId("live-state").className = "error";
    } finally {
      inFlight = false;
    }
    schedule(next);
  }

  function draw(st) {
    const now = performance.now();
    const seq = st.sequences;
    text("live-plan", st.plan || "");
    text("seq-summary", `${seq.active} running · cap ${seq.cap} of ${seq.max}`);
    drawSlots(seq);
    text("queue", st.queue.waiting ? `${st.queue.waiting} waiting for a sequence` : "empty");
    const kv = st.kv;
    // Running sequences' cells, then the prefix cache's cells stacked after them.
    text("kv-text", `${kv.cells_used} running + ${kv.cells_cached} prefix cache, of ${kv.cells_total}`);
    width("kv-used", kv.cells_used, kv.cells_total);
    width("kv-cached", kv.cells_cached, kv.cells_total);
    byId("kv-cached").style.left = byId("kv-used").style.width;
    const pc = st.prefix_cache;
    text("prefix-cache", `${pc.entries} entries, ${pc.cells} cells (${bytes(pc.kv_bytes)}) · ${pc.hits} hits, ` +
                         `${pc.misses} misses, ${pc.tokens_reused} tokens reused · RAM tier ${bytes(pc.ram.bytes)} ` +
                         `of ${bytes(pc.ram.budget_bytes)}`);
    drawMemory(st.memory);
    text("cap", seq.cap < seq.max ? `${seq.cap} of ${seq.max} sequences (lowered)` : `${seq.cap} of ${seq.max} sequences`);
    const d = st.degradation;
    text("degradation", d ? `${d.reason === "none" ? "normal" : d.reason} · ${d.preemptions} preemptions, ` +
                            `${d.resizes} resizes, ${d.cache_ram_releases} cache RAM releases` : "off");
    noteEvents(st);
    drawRate(st, now);
    previous = st;
    lastAt = now;
  }

  function drawSlots(seq) {
    const list = byId("slots");
    list.replaceChildren();
    for (const slot of seq.slots) {
      const item = document.createElement("li");
      item.className = "slot " + slot.state;
      item.dataset.state = slot.state;
      const label = document.createElement("span");
      label.textContent = `seq ${slot.seq_id}`;
      const state = document.createElement("span");
      state.className = "state";
      state.textContent = slot.state;
      const tokens = document.createElement("span");
      tokens.className = "tokens";
      tokens.textContent = `${slot.tokens} / ${seq.ctx_size} tokens`;
      const bar = document.createElement("div");
      bar.className = "bar";
      const fill = document.createElement("i");
      fill.style.width = Math.min(100, (100 * slot.tokens) / (seq.ctx_size || 1)).toFixed(1) + "%";
      bar.append(fill);
      item.append(label, state, tokens, bar);
      list.append(item);
    }
  }

  function drawMemory(m) {
    if (!m || m.host_free_bytes === undefined) {
      text("memory-text", m ? `reserve ${m.reserve}; not measured yet` : "not watched");
      return;
    }
    // The GPU's memory when the model is on one, else the host's (or the container's limit).
    const onGpu = m.gpu_total_bytes > 0;
    const free = onGpu ? m.gpu_free_bytes : m.host_free_bytes;
    const total = onGpu ? m.gpu_total_bytes : (m.cgroup_limit_bytes || m.host_total_bytes);
    text("memory-text", `${bytes(free)} free of ${bytes(total)}${onGpu ? " (GPU)" : ""} · reserve ${m.reserve}`);
    width("memory-bar", free, total);
    byId("memory-bar").className = free < m.reserve_bytes ? "critical" : free < 2 * m.reserve_bytes ? "low" : "";
  }

  // /status gives counters, not a history: the recent events are the changes seen since the page opened.
  function noteEvents(st) {
    if (!previous) return;
    const was = previous.degradation;
    const is = st.degradation;
    const changes = [];
    if (st.sequences.cap !== previous.sequences.cap) changes.push(`cap ${previous.sequences.cap} → ${st.sequences.cap}`);
    if (was && is) {
      if (is.reason !== was.reason) changes.push(`state: ${was.reason} → ${is.reason}`);
      if (is.preemptions > was.preemptions) changes.push(`${is.preemptions - was.preemptions} preempted`);
      if (is.resizes > was.resizes) changes.push("KV cache resized");
      if (is.cache_ram_releases > was.cache_ram_releases) changes.push("cache RAM released");
    }
    for (const change of changes) events.unshift({ at: new Date(), text: change });
    events.splice(6);
    const list = byId("events");
    list.replaceChildren();
    for (const e of events) {
      const item = document.createElement("li");
      item.textContent = `${e.at.toLocaleTimeString()} ${e.text}`;
      list.append(item);
    }
    if (!events.length) {
      const item = document.createElement("li");
      item.className = "muted";
      item.textContent = "no degradation events since this page opened";
      list.append(item);
    }
  }

  // Generated tokens per second: from a server counter when /status has one, else from how much each
  // generating sequence grew since the last poll (a sequence that ends between two polls is missed).
  function generatedSince(st) {
    const counter = st.engine && st.engine.tokens_generated;
    if (typeof counter === "number" && previous && typeof previous.engine.tokens_generated === "number") {
      return Math.max(0, counter - previous.engine.tokens_generated);
    }
    if (!previous) return 0;
    const before = new Map(previous.sequences.slots.map((s) => [s.seq_id, s]));
    let grown = 0;
    for (const slot of st.sequences.slots) {
      const was = before.get(slot.seq_id);
      if (slot.state === "generating" && was && was.state === "generating" && was.request_id === slot.request_id) {
        grown += Math.max(0, slot.tokens - was.tokens);
      }
    }
    return grown;
  }

  function drawRate(st, now) {
    if (previous && now > lastAt) samples.push({ at: now, rate: generatedSince(st) / ((now - lastAt) / 1000) });
    while (samples.length && samples[0].at < now - WINDOW_MS) samples.shift();
    const peak = Math.max(1, ...samples.map((s) => s.rate));
    const points = samples.map((s) => {
      const x = 300 - ((now - s.at) / WINDOW_MS) * 300;
      const y = 78 - (s.rate / peak) * 72;
      return `${x.toFixed(1)},${y.toFixed(1)}`;
    });
    byId("tps-line").setAttribute("points", points.join(" "));
    const latest = samples.length ? samples[samples.length - 1].rate : 0;
    text("tps-now", `${latest.toFixed(1)} now · peak ${peak > 1 ? peak.toFixed(1) : "–"}`);
  }

  function start(opts) {
    options = opts;
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible") schedule(0);
      else { clearTimeout(timer); timer = null; } // a hidden tab does not poll
    });
    schedule(0);
  }

  function restart() {
    failures = 0;
    schedule(0);
  }

  return { start, restart };
})();

window.Live = Live;
