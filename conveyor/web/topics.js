// Topics: the list, and one topic's page (partitions, offsets, retention, and a message
// browser by offset or by time).
import { get } from "./api.js";
import { bytes, duration, encodePath, h, link, messageBlock, number, rate, replace, table } from "./dom.js";

export const topicList = {
  section: "topics",
  title: () => "Topics",
  mount(root) {
    const holder = h("div");
    replace(root, h("h1", null, "Topics"), holder);
    return {
      async refresh() {
        const { topics } = await get("/api/conveyor/topics");
        replace(holder, table("Topics and the logs behind queues", [
          { label: "Name", name: true, value: (t) => link(`/topics/${encodePath(t.name)}`, t.name) },
          { label: "Kind", value: (t) => t.kind },
          { label: "Partitions", number: true, value: (t) => number(t.partitions) },
          { label: "Messages", number: true, value: (t) => number(t.messages) },
          { label: "Retention", value: (t) => t.cleanup_policy === "delete"
            ? `${duration(t.retention_ms)} / ${bytes(t.retention_bytes)}` : t.cleanup_policy },
          { label: "Publish", number: true, value: (t) => rate(t.publish_rate) },
        ], topics, "No topics yet."));
      },
    };
  },
};

export const topicPage = {
  section: "topics",
  title: (params) => `Topic ${params[0]}`,
  mount(root, params, ui) {
    const name = params[0];
    const summary = h("div");
    const results = h("div", { id: "topic-messages" });
    const partition = h("select", { id: "browse-partition" });
    const mode = h("select", { id: "browse-mode" },
      h("option", { value: "offset" }, "from offset"),
      h("option", { value: "time" }, "from time"),
      h("option", { value: "latest" }, "latest"));
    const offset = h("input", { id: "browse-offset", type: "number", min: "0", value: "0" });
    const when = h("input", { id: "browse-time", type: "datetime-local", step: "1" });
    const limit = h("input", { id: "browse-limit", type: "number", min: "1", max: "500", value: "20" });
    let nextOffset = null;
    let partitionsShown = 0;

    const browse = async (fromOffset) => {
      const query = new URLSearchParams({ partition: partition.value || "0", limit: limit.value });
      if (fromOffset !== undefined) query.set("offset", String(fromOffset));
      else if (mode.value === "offset") query.set("offset", offset.value || "0");
      else if (mode.value === "time" && when.value) {
        query.set("timestamp_ms", String(new Date(when.value).getTime()));
      }
      const result = await get(`/api/conveyor/topics/${encodePath(name)}/browse?${query}`);
      nextOffset = result.next_offset;
      replace(results,
        h("p", { class: "note" }, `Partition ${result.partition}: offsets ${number(result.log_start_offset)}`
          + ` to ${number(result.high_watermark)}; showing from ${number(result.offset)}.`),
        result.messages.length ? result.messages.map((message) => messageBlock(message))
          : h("p", { class: "empty" }, "No messages there."),
        result.messages.length ? h("button", { type: "button", class: "secondary",
          onclick: () => ui.act(() => browse(nextOffset)) }, "Next page") : null);
    };
    const form = h("form", { class: "inline", id: "browse-form" },
      h("label", { for: "browse-partition" }, "Partition", partition),
      h("label", { for: "browse-mode" }, "Start", mode),
      h("label", { for: "browse-offset" }, "Offset", offset),
      h("label", { for: "browse-time" }, "Time (local)", when),
      h("label", { for: "browse-limit" }, "Messages", limit),
      h("button", { type: "submit" }, "Browse"));
    form.addEventListener("submit", (event) => { event.preventDefault(); ui.act(() => browse()); });

    replace(root, h("h1", null, `Topic ${name}`), summary,
      h("section", { class: "panel", "aria-labelledby": "topic-browse" },
        h("h2", { id: "topic-browse" }, "Browse messages"),
        h("p", { class: "note" }, "Reading a topic here moves no group's offsets."), form, results));

    return {
      async refresh() {
        const { topics } = await get("/api/conveyor/topics");
        const topic = topics.find((t) => t.name === name);
        if (!topic) {
          replace(summary, h("p", { class: "empty" }, "This topic does not exist (any more)."));
          return;
        }
        if (partitionsShown !== topic.partitions) {
          partitionsShown = topic.partitions;
          replace(partition, topic.partition_offsets.map((p) =>
            h("option", { value: p.partition }, String(p.partition))));
        }
        replace(summary,
          h("p", null, `${topic.kind}, ${topic.partitions} partitions, cleanup ${topic.cleanup_policy},`
            + ` retention ${duration(topic.retention_ms)} / ${bytes(topic.retention_bytes)},`
            + ` publish ${rate(topic.publish_rate)}`),
          table("Partitions", [
            { label: "Partition", number: true, value: (p) => number(p.partition) },
            { label: "Log start", number: true, value: (p) => number(p.log_start_offset) },
            { label: "High watermark", number: true, value: (p) => number(p.high_watermark) },
            { label: "Messages", number: true,
              value: (p) => number(p.high_watermark - p.log_start_offset) },
          ], topic.partition_offsets));
      },
    };
  },
};
