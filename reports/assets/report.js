const number = (text) => {
  // a leading number ending the cell or followed by a space: "10.0% ✗ diverged", not the
  // run id "0e74aa8032bf"
  const match = text.trim().replace(/,/g, "")
    .match(/^[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?(%?)(?=\s|$)/i);
  return match ? parseFloat(match[0]) / (match[3] ? 100 : 1) : NaN;
};
const NUMBER = /^[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?%?$/i;
const named = (text) => text.trim().toLowerCase().replace(/[\s_]+/g, " ");
const TERM = /^([^=<>!]+?)(!=|<=|>=|=|<|>)(.*)$/;
const test = (cell, op, want) => {
  const a = number(cell), b = NUMBER.test(want) ? number(want) : NaN;
  const numeric = !isNaN(a) && !isNaN(b);
  const same = numeric ? Math.abs(a - b) <= 1e-9 * Math.max(1, Math.abs(b)) : cell === want;
  const order = same ? 0 : numeric ? a - b : cell.localeCompare(want);
  return {"=": same, "!=": !same, "<": order < 0, "<=": order <= 0, ">": order > 0,
          ">=": order >= 0}[op] && (numeric || op === "=" || op === "!=" || cell !== "");
};
document.querySelectorAll("table.sortable").forEach((table) => {
  const body = table.tBodies[0];
  const rows = () => Array.from(body.rows);
  const value = (row, i) => row.cells[i] ? row.cells[i].textContent.trim() : "";
  const heads = Array.from(table.querySelectorAll("thead th"));
  const names = heads.map((th) => [named(th.textContent), named(th.dataset.key || "")]);
  heads.forEach((th, i) => {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = th.textContent;
    button.title = "sort by " + th.textContent;
    th.textContent = "";
    th.appendChild(button);
    button.addEventListener("click", () => {
      const up = th.getAttribute("aria-sort") !== "ascending";
      heads.forEach((o) => o.removeAttribute("aria-sort"));
      th.setAttribute("aria-sort", up ? "ascending" : "descending");
      const sorted = rows().sort((a, b) => {
        const x = value(a, i), y = value(b, i);
        if (!x || !y) return (!x) - (!y);  // blanks last either way
        const nx = number(x), ny = number(y);
        const order = !isNaN(nx) && !isNaN(ny) && nx !== ny ? nx - ny
          : x.localeCompare(y, undefined, {numeric: true});
        return up ? order : -order;
      });
      sorted.forEach((row) => body.appendChild(row));
    });
  });
  const frame = table.closest(".scroll");
  const tools = frame.previousElementSibling;
  const hasTools = tools && tools.classList.contains("table-tools");
  const mark = () => {  // a frame wider than the window shows a shadow and a hint
    const over = frame.scrollWidth > frame.clientWidth + 1;
    frame.classList.toggle("overflows", over);
    if (hasTools) tools.classList.toggle("overflows", over);
  };
  mark();
  addEventListener("resize", mark);
  const input = hasTools && tools.querySelector("input");
  if (!input) return;
  const count = tools.querySelector("span");
  input.addEventListener("input", () => {
    const unknown = [];
    const checks = input.value.split(/\s+/).filter(Boolean).map((term) => {
      const match = term.match(TERM);
      const key = match && named(match[1]);
      const column = match ? names.findIndex(([head, alias]) => head === key || alias === key)
        : -1;
      if (match && column >= 0) {
        const want = match[3].trim().toLowerCase();
        return (row) => test(value(row, column).toLowerCase(), match[2], want);
      }
      if (match) unknown.push(match[1]);
      const word = term.toLowerCase();
      return (row) => row.textContent.toLowerCase().includes(word);
    });
    let shown = 0;
    rows().forEach((row) => {
      const keep = checks.every((check) => check(row));
      row.hidden = !keep;
      shown += keep;
    });
    count.textContent = checks.length ? `${shown} of ${rows().length} rows` +
      (unknown.length ? ` (no column ${unknown.join(", ")})` : "") : "";
  });
});
