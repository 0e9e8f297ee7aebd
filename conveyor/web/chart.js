// Charts drawn on <canvas> by hand: a line chart of rates over time and a bar chart of lag.
// Each canvas also gets an aria-label that says in words what it shows.

function prepare(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 600;
  const height = canvas.clientHeight || 200;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const context = canvas.getContext("2d");
  context.setTransform(ratio, 0, 0, ratio, 0, 0);
  context.clearRect(0, 0, width, height);
  context.font = "12px system-ui, sans-serif";
  return { context, width, height };
}

function niceMaximum(value) {
  if (value <= 1) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) {
    if (value <= step * power) return step * power;
  }
  return 10 * power;
}

// series: [{label, color, points: [{time_ms, value}]}]
export function lineChart(canvas, series, unit) {
  const { context, width, height } = prepare(canvas);
  const left = 52, right = 10, top = 10, bottom = 24;
  const all = series.flatMap((s) => s.points);
  const maximum = niceMaximum(Math.max(0, ...all.map((p) => p.value)));
  const times = all.map((p) => p.time_ms);
  const start = Math.min(...times), end = Math.max(...times);
  const span = Math.max(1, end - start);
  const x = (t) => left + ((t - start) / span) * (width - left - right);
  const y = (v) => top + (1 - v / maximum) * (height - top - bottom);
  context.strokeStyle = "#d9dee5";
  context.fillStyle = "#5b6776";
  context.lineWidth = 1;
  for (let step = 0; step <= 4; step += 1) {
    const value = (maximum * step) / 4;
    context.beginPath();
    context.moveTo(left, y(value));
    context.lineTo(width - right, y(value));
    context.stroke();
    context.fillText(`${value % 1 ? value.toFixed(1) : value}${unit}`, 4, y(value) + 4);
  }
  if (all.length) {
    const minutes = Math.round(span / 60000);
    context.fillText(minutes >= 1 ? `last ${minutes} min` : `last ${Math.round(span / 1000)} s`,
      left, height - 6);
    context.fillText("now", width - right - 24, height - 6);
  } else {
    context.fillText("collecting samples…", left + 8, height / 2);
  }
  for (const line of series) {
    context.strokeStyle = line.color;
    context.lineWidth = 2;
    context.beginPath();
    line.points.forEach((point, index) => {
      if (index === 0) context.moveTo(x(point.time_ms), y(point.value));
      else context.lineTo(x(point.time_ms), y(point.value));
    });
    context.stroke();
  }
  const latest = series.map((s) => {
    const last = s.points[s.points.length - 1];
    return `${s.label} ${last ? last.value.toFixed(2) : 0}${unit}`;
  });
  canvas.setAttribute("aria-label", `Chart of message rates; latest: ${latest.join(", ")}`);
}

// bars: [{label, value}]
export function barChart(canvas, bars, what) {
  const { context, width, height } = prepare(canvas);
  const left = 52, bottom = 24, top = 10;
  const maximum = niceMaximum(Math.max(0, ...bars.map((b) => b.value)));
  const slot = (width - left - 10) / Math.max(1, bars.length);
  context.fillStyle = "#5b6776";
  context.fillText(String(maximum), 4, top + 8);
  context.fillText("0", 4, height - bottom);
  bars.forEach((bar, index) => {
    const barHeight = (bar.value / maximum) * (height - top - bottom);
    context.fillStyle = "#d9730d";
    context.fillRect(left + index * slot + 2, height - bottom - barHeight,
      Math.max(2, slot - 4), barHeight);
    if (slot > 28) {
      context.fillStyle = "#5b6776";
      context.fillText(bar.label, left + index * slot + 2, height - 8);
    }
  });
  canvas.setAttribute("aria-label", `${what}: ` +
    (bars.map((b) => `${b.label} ${b.value}`).join(", ") || "none"));
}
