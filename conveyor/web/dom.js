// Safe DOM building and formatting. Every name, body and header the UI shows goes
// through text nodes (textContent), never through HTML parsing: a queue or exchange
// named "<script>" is displayed as those characters and cannot run.

export function h(tag, attributes, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      element.addEventListener(name.slice(2), value);
    } else if (name === "href" && !String(value).startsWith("#")) {
      throw new Error("only in-page links are built");
    } else {
      element.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function replace(element, ...children) {
  element.replaceChildren();
  append(element, children);
}

export function link(path, text) {
  return h("a", { href: "#" + path }, text);
}

export function encodePath(name) {
  return encodeURIComponent(name);
}

export function number(value) {
  if (value === undefined || value === null) return "–";
  return Number(value).toLocaleString("en-US");
}

export function rate(value) {
  if (value === undefined || value === null) return "–";
  const fixed = value >= 100 ? value.toFixed(0) : value.toFixed(value >= 10 ? 1 : 2);
  return `${fixed}/s`;
}

export function bytes(count) {
  if (count === undefined || count === null || count < 0) return "unlimited";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = count;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

export function duration(ms) {
  if (ms === undefined || ms === null || ms < 0) return "forever";
  const hours = ms / 3600000;
  if (hours >= 48) return `${(hours / 24).toFixed(1)} days`;
  if (hours >= 1) return `${hours.toFixed(1)} h`;
  return `${(ms / 60000).toFixed(1)} min`;
}

export function time(ms) {
  if (!ms) return "–";
  return new Date(ms).toISOString().replace("T", " ").replace("Z", " UTC");
}

// A table: columns = [{label, value(row) -> node|text, number?: bool, name?: bool}]
export function table(caption, columns, rows, emptyText) {
  const head = h("tr", null, columns.map((column) => h("th", {
    scope: "col", class: column.number ? "number" : null }, column.label)));
  const body = rows.length
    ? rows.map((row) => h("tr", null, columns.map((column) => h("td", {
      class: column.number ? "number" : column.name ? "name" : null }, column.value(row)))))
    : [h("tr", null, h("td", { colspan: columns.length, class: "empty" }, emptyText || "none"))];
  return h("div", { class: "table-wrap" },
    h("table", null, h("caption", null, caption), h("thead", null, head), h("tbody", null, body)));
}

export function card(label, value, id) {
  return h("div", { class: "card" }, h("span", { class: "label" }, label),
    h("span", { class: "value", "data-card": id || null }, value));
}

// A bounded preview from the API ({bytes, text | hex, binary, truncated}) as a <pre>.
export function preview(value) {
  if (!value || value.null) return h("pre", null, "(null)");
  const note = value.truncated ? ` … (${number(value.bytes)} bytes in all)` : "";
  if (value.binary) {
    return h("div", null, h("span", { class: "badge" }, `binary, ${number(value.bytes)} bytes`),
      h("pre", null, value.hex + note));
  }
  return h("pre", null, value.text + note);
}

export function messageBlock(message, extra) {
  const headers = Object.entries(message.headers || {});
  return h("article", { class: "message", "data-offset": message.offset },
    h("div", { class: "meta" },
      h("span", null, `partition ${message.partition} · offset ${message.offset}`),
      h("span", null, time(message.timestamp_ms)),
      message.key && !message.key.null ? h("span", null, "key: ", message.key.text ?? "(binary)") : null,
      extra || null),
    preview(message.value),
    headers.length ? h("details", null, h("summary", null, `${headers.length} headers`),
      h("ul", null, headers.map(([name, value]) => h("li", null, `${name}: ${value ?? "(null)"}`))))
      : null);
}
