// Queues: the list, and one queue's page (depth, rates, purge, delete, publish, browse
// without consuming, the dead-letter queue and its redrive).
import { get, send, VHOST } from "./api.js";
import { lineChart } from "./chart.js";
import { card, encodePath, h, link, messageBlock, number, rate, replace, table } from "./dom.js";

export const queueList = {
  section: "queues",
  title: () => "Queues",
  mount(root) {
    const holder = h("div");
    replace(root, h("h1", null, "Queues"), holder);
    return {
      async refresh() {
        const queues = await get("/api/queues");
        replace(holder, table("Queues", [
          { label: "Name", name: true, value: (q) => link(`/queues/${encodePath(q.name)}`, q.name) },
          { label: "Ready", number: true, value: (q) => number(q.messages_ready) },
          { label: "Unacked", number: true, value: (q) => number(q.messages_unacknowledged) },
          { label: "Delayed", number: true, value: (q) => number(q.messages_delayed) },
          { label: "Consumers", number: true, value: (q) => number(q.consumers) },
          { label: "Publish", number: true, value: (q) => rate(q.message_stats.publish_details.rate) },
          { label: "Deliver", number: true,
            value: (q) => rate(q.message_stats.deliver_get_details.rate) },
        ], queues, "No queues yet."));
      },
    };
  },
};

function twoStep(label, confirmLabel, action) {
  // A destructive button asks once more, in the page (no modal dialog to trap focus).
  const button = h("button", { type: "button", class: "danger" }, label);
  let armed = false;
  button.addEventListener("click", async () => {
    if (!armed) {
      armed = true;
      button.textContent = confirmLabel;
      return;
    }
    armed = false;
    button.textContent = label;
    await action();
  });
  button.addEventListener("blur", () => { armed = false; button.textContent = label; });
  return button;
}

function parseHeaders(text) {
  const headers = {};
  for (const pair of text.split(",").map((part) => part.trim()).filter(Boolean)) {
    const index = pair.indexOf("=");
    if (index < 1) throw new Error(`header "${pair}" is not name=value`);
    headers[pair.slice(0, index).trim()] = pair.slice(index + 1).trim();
  }
  return headers;
}

export const queuePage = {
  section: "queues",
  title: (params) => `Queue ${params[0]}`,
  mount(root, params, ui) {
    const name = params[0];
    const path = `/api/queues/${VHOST}/${encodePath(name)}`;
    const cards = h("div", { class: "cards" });
    const canvas = h("canvas", { class: "chart", role: "img", "aria-label": "Queue rates" });
    const points = { publish: [], deliver: [] };
    const browseList = h("div", { id: "browse-results" });
    const deadList = h("div", { id: "dead-letters" });
    const deadSummary = h("p", { class: "note", id: "dead-summary" }, "…");
    const payload = h("textarea", { id: "publish-payload", name: "payload" });
    const headers = h("input", { id: "publish-headers", name: "headers", placeholder: "a=1, b=2" });
    const limit = h("select", { id: "browse-limit" },
      ["10", "50", "200"].map((value) => h("option", { value }, value)));

    const publish = h("form", { class: "inline", id: "publish-form" },
      h("label", { for: "publish-payload" }, "Message body", payload),
      h("label", { for: "publish-headers" }, "Headers (name=value, …)", headers),
      h("button", { type: "submit" }, "Publish"));
    publish.addEventListener("submit", async (event) => {
      event.preventDefault();
      await ui.act(async () => {
        const result = await send("POST", `/api/exchanges/${VHOST}/amq.default/publish`, {
          routing_key: name, payload: payload.value, payload_encoding: "string",
          properties: { headers: parseHeaders(headers.value) } });
        ui.info(result.routed ? "Published 1 message." : "Not routed: the queue is gone.");
        await view.refresh();
      });
    });

    const browse = async () => {
      const result = await get(`/api/conveyor/queues/${encodePath(name)}/browse?limit=${limit.value}`);
      replace(browseList, result.messages.length
        ? result.messages.map((message) => messageBlock(message, [
          h("span", { class: "badge" }, message.state),
          h("span", null, `delivered ${message.delivery_count}×`)]))
        : h("p", { class: "empty" }, "No messages waiting."));
    };
    const showDead = async () => {
      const result = await get(`/api/conveyor/queues/${encodePath(name)}/dead-letters?limit=50`);
      replace(deadList, result.messages.map((message) => messageBlock(message)));
    };

    replace(root,
      h("h1", null, `Queue ${name}`), cards,
      h("section", { class: "panel", "aria-labelledby": "queue-rates" },
        h("h2", { id: "queue-rates" }, "Rates since this page opened"), canvas,
        h("p", { class: "legend" }, h("span", null, h("span", { class: "swatch publish" }), "publish"),
          h("span", null, h("span", { class: "swatch deliver" }), "deliver"))),
      h("section", { class: "panel", "aria-labelledby": "queue-publish" },
        h("h2", { id: "queue-publish" }, "Publish a message"), publish),
      h("section", { class: "panel", "aria-labelledby": "queue-browse" },
        h("h2", { id: "queue-browse" }, "Browse messages"),
        h("p", { class: "note" }, "Browsing shows waiting messages without consuming them."),
        h("div", { class: "actions" }, h("label", { for: "browse-limit" }, "How many", limit),
          h("button", { type: "button", id: "browse-button", onclick: () => ui.act(browse) },
            "Browse")),
        browseList),
      h("section", { class: "panel", "aria-labelledby": "queue-dead" },
        h("h2", { id: "queue-dead" }, "Dead letters"), deadSummary,
        h("div", { class: "actions" },
          h("button", { type: "button", class: "secondary", id: "dead-button",
            onclick: () => ui.act(showDead) }, "Show dead letters"),
          h("button", { type: "button", id: "redrive-button", onclick: () => ui.act(async () => {
            const result = await send("POST",
              `/topics/${encodePath(name)}/groups/${encodePath(name)}/dlq/redrive`, {});
            ui.info(`Redrove ${result.redriven} messages to ${name}.`);
            replace(deadList);
            await view.refresh();
          }) }, "Redrive all")),
        deadList),
      h("section", { class: "panel", "aria-labelledby": "queue-danger" },
        h("h2", { id: "queue-danger" }, "Purge or delete"),
        h("div", { class: "actions" },
          twoStep("Purge", "Really purge?", () => ui.act(async () => {
            await send("DELETE", `${path}/contents`);
            ui.info("Queue purged.");
            await view.refresh();
          })),
          twoStep("Delete queue", "Really delete?", async () => {
            ui.suspend();
            try {
              await send("DELETE", path);
            } catch (error) {
              ui.resume();
              ui.error(error.message);
              return;
            }
            ui.navigate("/queues", `Queue ${name} deleted.`);
          }))));

    const view = {
      async refresh() {
        const queue = await get(path);
        const stats = queue.message_stats;
        replace(cards,
          card("Ready", number(queue.messages_ready), "ready"),
          card("Unacked", number(queue.messages_unacknowledged), "unacked"),
          card("Delayed", number(queue.messages_delayed), "delayed"),
          card("Consumers", number(queue.consumers), "consumers"),
          card("Publish rate", rate(stats.publish_details.rate), "publish-rate"),
          card("Deliver rate", rate(stats.deliver_get_details.rate), "deliver-rate"));
        const now = Date.now();
        points.publish.push({ time_ms: now, value: stats.publish_details.rate });
        points.deliver.push({ time_ms: now, value: stats.deliver_get_details.rate });
        for (const series of Object.values(points)) if (series.length > 300) series.shift();
        lineChart(canvas, [
          { label: "publish", color: "#1f77b4", points: points.publish },
          { label: "deliver", color: "#d9730d", points: points.deliver }], "/s");
        const dead = await get(`/api/conveyor/queues/${encodePath(name)}/dead-letters?limit=1`);
        deadSummary.textContent = dead.dead_letter_queue
          ? `${number(dead.count)} dead letters in ${dead.dead_letter_queue}.`
          : "This queue does not keep dead letters.";
        for (const id of ["dead-button", "redrive-button"]) {
          root.querySelector(`#${id}`).disabled = !dead.dead_letter_queue;
        }
      },
    };
    return view;
  },
};
