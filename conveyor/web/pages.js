// Overview, consumer groups, exchanges and bindings, connections and channels.
import { get } from "./api.js";
import { barChart, lineChart } from "./chart.js";
import { card, encodePath, h, link, number, rate, replace, table } from "./dom.js";

export const overview = {
  section: "overview",
  title: () => "Overview",
  mount(root) {
    const cards = h("div", { class: "cards", id: "overview-cards" });
    const canvas = h("canvas", { class: "chart", id: "rates-chart", role: "img",
      "aria-label": "Chart of message rates" });
    const listeners = h("div");
    replace(root, h("h1", null, "Overview"), cards,
      h("section", { class: "panel", "aria-labelledby": "rates-title" },
        h("h2", { id: "rates-title" }, "Message rates, last minutes"), canvas,
        h("p", { class: "legend" },
          h("span", null, h("span", { class: "swatch publish" }), "publish"),
          h("span", null, h("span", { class: "swatch deliver" }), "deliver"))),
      listeners);
    return {
      async refresh() {
        const [summary, history] = await Promise.all([
          get("/api/overview"), get("/api/conveyor/history?samples=300")]);
        const totals = summary.object_totals;
        replace(cards,
          card("Publish rate", rate(summary.message_stats.publish_details.rate), "publish-rate"),
          card("Deliver rate", rate(summary.message_stats.deliver_get_details.rate), "deliver-rate"),
          card("Messages ready", number(summary.queue_totals.messages_ready), "ready"),
          card("Unacked", number(summary.queue_totals.messages_unacknowledged), "unacked"),
          card("Queues", number(totals.queues), "queues"),
          card("Topics", number(totals.topics), "topics"),
          card("Connections", number(totals.connections), "connections"),
          card("Consumers", number(totals.consumers), "consumers"));
        lineChart(canvas, [
          { label: "publish", color: "#1f77b4",
            points: history.series.map((p) => ({ time_ms: p.time_ms, value: p.publish })) },
          { label: "deliver", color: "#d9730d",
            points: history.series.map((p) => ({ time_ms: p.time_ms, value: p.deliver })) },
        ], "/s");
        replace(listeners, table("Listeners", [
          { label: "Protocol", value: (l) => l.protocol },
          { label: "Port", number: true, value: (l) => String(l.port) },
        ], summary.listeners));
      },
    };
  },
};

export const groupList = {
  section: "groups",
  title: () => "Consumer groups",
  mount(root) {
    const holder = h("div");
    replace(root, h("h1", null, "Consumer groups"), holder);
    return {
      async refresh() {
        const { groups } = await get("/api/conveyor/groups");
        const ordered = groups.filter((g) => g.kind === "ordered");
        const shared = groups.filter((g) => g.kind === "shared");
        replace(holder,
          table("Ordered groups (Kafka consumer groups)", [
            { label: "Group", name: true, value: (g) => link(`/groups/${encodePath(g.group)}`, g.group) },
            { label: "State", value: (g) => g.state },
            { label: "Members", number: true, value: (g) => number(g.members) },
            { label: "Topics", value: (g) => g.topics.join(", ") },
            { label: "Lag", number: true, value: (g) => number(g.total_lag) },
          ], ordered, "No ordered groups."),
          table("Shared groups on topics (queues are on the Queues page)", [
            { label: "Group", name: true, value: (g) => g.group },
            { label: "Topic", name: true, value: (g) => link(`/topics/${encodePath(g.topic)}`, g.topic) },
          ], shared, "No shared groups on topics."));
      },
    };
  },
};

export const groupPage = {
  section: "groups",
  title: (params) => `Group ${params[0]}`,
  mount(root, params) {
    const name = params[0];
    const summary = h("p");
    const members = h("div");
    const lags = h("div");
    const canvas = h("canvas", { class: "chart", id: "lag-chart", role: "img", "aria-label": "Lag" });
    replace(root, h("h1", null, `Group ${name}`), summary, members,
      h("section", { class: "panel", "aria-labelledby": "lag-title" },
        h("h2", { id: "lag-title" }, "Lag per partition"), canvas, lags));
    return {
      async refresh() {
        const group = await get(`/api/conveyor/groups/${encodePath(name)}`);
        summary.textContent = `${group.state}, generation ${group.generation}, protocol `
          + `${group.protocol_type || "–"}/${group.protocol || "–"}, total lag ${number(group.total_lag)}`;
        replace(members, table("Members", [
          { label: "Member", name: true, value: (m) => m.member_id },
          { label: "Client", value: (m) => m.client_id },
          { label: "Host", value: (m) => m.client_host },
          { label: "Assignment", value: (m) => m.assignment.map(
            (a) => `${a.topic} [${a.partitions.join(", ")}]`).join("; ") || "–" },
        ], group.members, "No members: the group is empty."));
        replace(lags, table("Committed offsets and lag", [
          { label: "Topic", name: true, value: (p) => p.topic },
          { label: "Partition", number: true, value: (p) => number(p.partition) },
          { label: "Committed", number: true,
            value: (p) => p.committed_offset < 0 ? "none" : number(p.committed_offset) },
          { label: "High watermark", number: true, value: (p) => number(p.high_watermark) },
          { label: "Lag", number: true, value: (p) => number(p.lag) },
        ], group.partitions));
        barChart(canvas, group.partitions.map((p) => ({
          label: `${p.topic}/${p.partition}`, value: p.lag })), "Lag per partition");
      },
    };
  },
};

export const exchanges = {
  section: "exchanges",
  title: () => "Exchanges",
  mount(root) {
    const holder = h("div");
    replace(root, h("h1", null, "Exchanges and bindings"), holder);
    return {
      async refresh() {
        const [list, bindings] = await Promise.all([get("/api/exchanges"), get("/api/bindings")]);
        replace(holder,
          table("Exchanges", [
            { label: "Name", name: true, value: (e) => e.name || "(default)" },
            { label: "Type", value: (e) => e.type },
            { label: "Durable", value: (e) => (e.durable ? "yes" : "no") },
            { label: "Internal", value: (e) => (e.internal ? "yes" : "no") },
            { label: "Arguments", value: (e) => JSON.stringify(e.arguments) },
          ], list),
          table("Bindings", [
            { label: "Source", name: true, value: (b) => b.source || "(default)" },
            { label: "Destination", name: true, value: (b) => b.destination },
            { label: "Kind", value: (b) => b.destination_type },
            { label: "Routing key", name: true, value: (b) => b.routing_key },
            { label: "Arguments", value: (b) => JSON.stringify(b.arguments) },
          ], bindings));
      },
    };
  },
};

export const connections = {
  section: "connections",
  title: () => "Connections",
  mount(root) {
    const holder = h("div");
    replace(root, h("h1", null, "Connections and channels"), holder);
    return {
      async refresh() {
        const [list, channels, consumers] = await Promise.all([
          get("/api/connections"), get("/api/channels"), get("/api/consumers")]);
        replace(holder,
          table("Connections", [
            { label: "Client", name: true, value: (c) => `${c.peer_host}:${c.peer_port}` },
            { label: "Protocol", value: (c) => c.protocol },
            { label: "Name", name: true, value: (c) => String(c.client_properties.connection_name
              ?? c.client_properties.product ?? "") },
            { label: "User", value: (c) => c.user },
            { label: "Vhost", value: (c) => c.vhost },
            { label: "Port", number: true, value: (c) => String(c.port) },
            { label: "Channels", number: true, value: (c) => number(c.channels) },
          ], list, "No client connections."),
          table("Channels", [
            { label: "Channel", name: true, value: (c) => c.name },
            { label: "Protocol", value: (c) => c.protocol },
            { label: "Consumers", number: true, value: (c) => number(c.consumer_count) },
            { label: "Unacked", number: true, value: (c) => number(c.messages_unacknowledged) },
            { label: "Prefetch", number: true, value: (c) => number(c.prefetch_count) },
            { label: "Mode", value: (c) => [c.confirm ? "confirm" : "", c.transactional ? "tx" : ""]
              .filter(Boolean).join(", ") || "–" },
          ], channels, "No channels."),
          table("Consumers", [
            { label: "Tag", name: true, value: (c) => c.consumer_tag },
            { label: "Queue", name: true,
              value: (c) => link(`/queues/${encodePath(c.queue.name)}`, c.queue.name) },
            { label: "Channel", name: true, value: (c) => c.channel_details.name },
            { label: "Ack", value: (c) => (c.ack_required ? "manual" : "auto") },
            { label: "Prefetch", number: true, value: (c) => number(c.prefetch_count) },
          ], consumers, "No consumers."));
      },
    };
  },
};
