// The admin API (/v1), as the console calls it: the session cookie goes along by itself, a
// change carries the session's CSRF token, and errors become ApiError with the API's detail.

const csrf = document.querySelector('meta[name="payler-csrf"]')?.content || "";

export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }

  get unavailable() {
    return this.status === 503 || this.status === 0;
  }
}

export async function api(method, path, { query, body } = {}) {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(query || {})) {
    if (value !== null && value !== undefined && value !== "") params.set(key, value);
  }
  const url = `/v1${path}${params.size ? `?${params}` : ""}`;
  const headers = { Accept: "application/json" };
  if (method !== "GET" && csrf) headers["X-Payler-CSRF"] = csrf;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(url, {
      method, headers, credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    throw new ApiError(0, "payler does not answer: is the daemon running?");
  }
  if (response.status === 401) {
    const next = location.pathname + location.search;
    location.assign(`/ui/login?${new URLSearchParams({ next })}`);
    throw new ApiError(401, "Your session ended: sign in again.");
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    let detail = data && data.detail;
    if (Array.isArray(detail)) detail = detail.map((d) => d.msg).join("; ");
    throw new ApiError(response.status, detail || `${response.status} ${response.statusText}`);
  }
  return data;
}

export const quote = (id) => encodeURIComponent(id);
