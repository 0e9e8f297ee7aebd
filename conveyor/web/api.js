// Calls to the broker's /api (RabbitMQ-compatible and /api/conveyor) and HTTP API routes.
// Errors come in two shapes: RabbitMQ's {"error": "...", "reason": "..."} and Conveyor's
// {"error": {"code", "message"}}; both become an Error with a readable message.

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function parse(response) {
  const text = await response.text();
  let document = null;
  if (text) {
    try { document = JSON.parse(text); } catch { document = null; }
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    if (document && typeof document.error === "string") {
      message = `${document.error}: ${document.reason || ""}`;
    } else if (document && document.error && document.error.message) {
      message = `${document.error.code}: ${document.error.message}`;
    }
    throw new ApiError(response.status, message);
  }
  return document;
}

export async function get(path) {
  const response = await fetch(path, { headers: { Accept: "application/json" } });
  return parse(response);
}

export async function send(method, path, body) {
  const options = { method, headers: { Accept: "application/json" } };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  return parse(await fetch(path, options));
}

export const VHOST = "%2F";
