// Sluice status page: refreshes the running export's progress from its JSON document
// (the same fields as the 202 body of $export-status) and cancels it on request. No
// framework, no build step.
(() => {
  const box = document.querySelector("[data-progress]");
  if (!box) return;
  const note = document.getElementById("note");
  const seconds = (s) =>
    s == null ? "unknown" : s < 90 ? `${Math.round(s)} s` : `${Math.round(s / 60)} min`;
  const bar = (row, p) => {
    const bar = row.querySelector("progress");
    bar.max = Math.max(p.total, 1);
    bar.value = p.done;
    row.querySelector(".count").textContent = `${p.done} / ${p.total}`;
  };
  const rowFor = (type) => {
    let row = box.querySelector(`tr[data-type="${CSS.escape(type)}"]`);
    if (!row) {
      row = document.createElement("tr");
      row.dataset.type = type;
      row.innerHTML = '<td class="type"></td><td><progress></progress></td><td class="count"></td>';
      row.querySelector(".type").textContent = type;
      box.querySelector("tbody").appendChild(row);
    }
    return row;
  };
  async function refresh() {
    let j;
    try {
      const r = await fetch(box.dataset.progress, { headers: { accept: "application/json" }, cache: "no-store" });
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      j = await r.json();
    } catch (e) {
      note.textContent = `refreshing failed (${e.message}); retrying`;
      setTimeout(refresh, 2000);
      return;
    }
    if (j.status !== "accepted" && j.status !== "in-progress") {
      location.reload();
      return;
    }
    note.textContent = "";
    bar(document.getElementById("overall"), j);
    document.getElementById("percent").textContent = `${j.percent}%`;
    for (const [type, p] of Object.entries(j.types || {})) bar(rowFor(type), p);
    document.getElementById("rate").textContent =
      j.ratePerSecond == null ? "unknown" : `${Math.round(j.ratePerSecond)} resources/s`;
    document.getElementById("left").textContent = seconds(j.estimatedSecondsLeft);
    setTimeout(refresh, 1000);
  }
  const cancel = document.getElementById("cancel");
  cancel?.addEventListener("click", async () => {
    cancel.disabled = true;
    const r = await fetch(box.dataset.cancel, { method: "DELETE" });
    if (r.status === 202 || r.status === 404) {
      location.reload();
    } else {
      note.textContent = `cancelling failed: HTTP ${r.status}`;
      cancel.disabled = false;
    }
  });
  setTimeout(refresh, 1000);
})();
