// hub admin page (PROTOCOL §12): the HTTP API only, refreshed every REFRESH_MS.
// Every URL is relative to the page (<root>/admin), so the page works under a mount.
// Text from the API is put in the page with textContent only, never as HTML.
"use strict";

const REFRESH_MS = 1500;
const HISTORY_LIMIT = 20;
const KEY_STORAGE = "hub.apiKey";

const state = {
  key: sessionStorage.getItem(KEY_STORAGE),
  selected: null,
  timer: null,
  generation: 0, // the latest refresh; only it schedules the next one
};

const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function channelPath(channel) {
  // "." and ".." would be dot segments that a browser removes from the path.
  return encodeURIComponent(channel).replace(/\./g, "%2E");
}

async function api(method, path, body) {
  const headers = {};
  if (state.key) headers["X-API-Key"] = state.key;
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  let reply = null;
  try {
    reply = await response.json();
  } catch (_) {
    reply = null;
  }
  if (!response.ok) {
    const error = (reply && reply.error) || {};
    throw new ApiError(response.status, error.code || "http_" + response.status,
      error.message || response.statusText);
  }
  return reply;
}

// --- small DOM helpers -------------------------------------------------------------------

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function fillTable(id, rows) {
  const body = $(id).querySelector("tbody");
  body.replaceChildren(...rows);
}

function duration(seconds) {
  seconds = Math.max(0, Math.round(seconds));
  const d = Math.floor(seconds / 86400);
  const h = Math.floor((seconds % 86400) / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  const s = seconds % 60;
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${s}s`;
  return `${s}s`;
}

function clock(ms) {
  const date = new Date(ms);
  return date.toLocaleTimeString([], { hour12: false }) + "." +
    String(date.getMilliseconds()).padStart(3, "0");
}

function setStatus(ok, text) {
  $("live").className = "dot " + (ok ? "ok" : "bad");
  $("status-text").textContent = text;
}

// --- the views ------------------------------------------------------------------------------

function showStats(stats) {
  for (const name of ["nodes", "connections", "users", "channels", "subscriptions"]) {
    $("total-" + name).textContent = stats.total[name];
  }
  const now = Date.now() / 1000;
  const rows = stats.nodes.map((node) => {
    const tr = document.createElement("tr");
    tr.append(
      cell(node.node, "mono"),
      cell(node.connections, "num"),
      cell(node.users, "num"),
      cell(node.subscriptions, "num"),
      cell(node.channels, "num"),
      cell(duration(node.updated - node.started), "num"),
      cell(duration(now - node.updated) + " ago", "num"),
    );
    return tr;
  });
  fillTable("nodes", rows);
}

function showChannels(reply) {
  const names = Object.keys(reply.channels).sort();
  const rows = names.map((name) => {
    const tr = document.createElement("tr");
    tr.dataset.channel = name;
    if (name === state.selected) tr.className = "selected";
    tr.append(cell(name, "mono"), cell(reply.channels[name], "num"));
    tr.addEventListener("click", () => select(name));
    return tr;
  });
  fillTable("channels", rows);
  $("channels-empty").hidden = names.length > 0;
}

function showPresence(reply) {
  const rows = reply.clients.map((client) => {
    const tr = document.createElement("tr");
    tr.append(
      cell(client.user),
      cell(client.client, "mono"),
      cell(client.node, "mono"),
      cell(client.info === undefined ? "" : JSON.stringify(client.info), "data"),
    );
    return tr;
  });
  fillTable("presence", rows);
  $("presence-note").textContent = rows.length ? "" : "Nobody is subscribed.";
}

function showHistory(reply) {
  const rows = reply.messages.slice().reverse().map((message) => {
    const tr = document.createElement("tr");
    tr.append(
      cell(message.offset, "num"),
      cell(clock(message.ts)),
      cell(message.event || ""),
      cell(JSON.stringify(message.data), "data"),
    );
    return tr;
  });
  fillTable("history", rows);
  $("history-note").textContent = rows.length
    ? `epoch ${reply.epoch}, latest offset ${reply.offset}`
    : `No stored messages (epoch ${reply.epoch}, offset ${reply.offset}).`;
}

function unavailable(tableId, noteId, error) {
  fillTable(tableId, []);
  $(noteId).textContent = error.code === "forbidden"
    ? "Off for this channel's namespace."
    : `${error.code}: ${error.message}`;
}

// --- refresh loop ------------------------------------------------------------------------

async function refreshChannel() {
  const channel = state.selected;
  if (channel === null) return;
  const path = channelPath(channel);
  const [presence, history] = await Promise.allSettled([
    api("GET", "api/presence/" + path),
    api("GET", `api/history/${path}?limit=${HISTORY_LIMIT}`),
  ]);
  if (channel !== state.selected) return;
  for (const result of [presence, history]) {
    if (result.status === "rejected" && result.reason.status === 401) throw result.reason;
  }
  if (presence.status === "fulfilled") showPresence(presence.value);
  else unavailable("presence", "presence-note", presence.reason);
  if (history.status === "fulfilled") showHistory(history.value);
  else unavailable("history", "history-note", history.reason);
}

async function refresh() {
  clearTimeout(state.timer);
  const generation = ++state.generation;
  try {
    const prefix = $("channel-prefix").value;
    const [stats, channels] = await Promise.all([
      api("GET", "api/stats"),
      api("GET", "api/channels?prefix=" + encodeURIComponent(prefix)),
    ]);
    showStats(stats);
    showChannels(channels);
    await refreshChannel();
    setStatus(true, "live · " + new Date().toLocaleTimeString([], { hour12: false }));
  } catch (error) {
    if (error instanceof ApiError && (error.status === 401 || error.status === 403)) {
      signedOut(error);
      return;
    }
    setStatus(false, "refresh failed: " + error.message);
  }
  if (generation === state.generation) state.timer = setTimeout(refresh, REFRESH_MS);
}

function select(channel) {
  state.selected = channel;
  $("selected-name").textContent = channel;
  $("inspect-channel").value = channel;
  for (const tr of $("channels").querySelectorAll("tbody tr")) {
    tr.classList.toggle("selected", tr.dataset.channel === channel);
  }
  if (!$("publish-channel").value) $("publish-channel").value = channel;
  refresh();
}

// --- sign-in -------------------------------------------------------------------------------

function signedOut(error) {
  clearTimeout(state.timer);
  state.generation += 1;
  sessionStorage.removeItem(KEY_STORAGE);
  const hadKey = state.key !== null;
  state.key = null;
  $("main").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  setStatus(false, "signed out");
  if (error && error.status === 403) {
    $("login-error").textContent = "The HTTP API is off: the node has no HUB_API_KEY.";
  } else if (hadKey) {
    $("login-error").textContent = "The key was refused.";
  }
  $("login-key").focus();
}

function signedIn(devMode) {
  $("login").hidden = true;
  $("main").hidden = false;
  $("logout").hidden = devMode;
  $("mode").hidden = !devMode;
  $("mode").textContent = "dev mode";
  $("mode").className = "badge warn";
  refresh();
}

async function start() {
  try {
    await api("GET", "api/stats");
    signedIn(state.key === null);
  } catch (error) {
    if (error instanceof ApiError && (error.status === 401 || error.status === 403)) {
      signedOut(error);
    } else {
      setStatus(false, "node unreachable: " + error.message);
      state.timer = setTimeout(start, REFRESH_MS);
    }
  }
}

async function login(event) {
  event.preventDefault();
  const key = $("login-key").value.trim();
  state.key = key;
  try {
    await api("GET", "api/stats");
  } catch (error) {
    state.key = null;
    $("login-error").textContent = error.status === 401
      ? "Wrong API key."
      : `${error.code}: ${error.message}`;
    return;
  }
  sessionStorage.setItem(KEY_STORAGE, key);
  $("login-error").textContent = "";
  $("login-key").value = "";
  signedIn(false);
}

// --- console -------------------------------------------------------------------------------

function parseData(id, resultId) {
  try {
    return { ok: true, value: JSON.parse($(id).value) };
  } catch (error) {
    showResult(resultId, false, "data is not JSON: " + error.message);
    return { ok: false };
  }
}

function showResult(id, ok, text) {
  $(id).className = "result " + (ok ? "ok" : "bad");
  $(id).textContent = text;
}

async function submit(event, path, body, resultId, describe) {
  event.preventDefault();
  try {
    const reply = await api("POST", path, body);
    showResult(resultId, true, describe(reply));
    refresh();
  } catch (error) {
    showResult(resultId, false, `${error.status} ${error.code}: ${error.message}`);
  }
}

function withEvent(body, id) {
  const eventName = $(id).value.trim();
  if (eventName) body.event = eventName;
  return body;
}

function publish(event) {
  const data = parseData("publish-data", "publish-result");
  if (!data.ok) { event.preventDefault(); return; }
  const channel = $("publish-channel").value.trim();
  const body = withEvent({ channel, data: data.value }, "publish-event");
  submit(event, "api/publish", body, "publish-result", (reply) =>
    reply.offset === undefined
      ? `published to ${channel}`
      : `published to ${channel} at offset ${reply.offset} (epoch ${reply.epoch})`);
}

function send(event) {
  const data = parseData("send-data", "send-result");
  if (!data.ok) { event.preventDefault(); return; }
  const user = $("send-user").value.trim();
  const body = withEvent({ user, data: data.value }, "send-event");
  submit(event, "api/send", body, "send-result", () => `sent to ${user}`);
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", () => signedOut(null));
  $("publish-form").addEventListener("submit", publish);
  $("send-form").addEventListener("submit", send);
  $("channel-prefix").addEventListener("input", refresh);
  $("inspect-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const channel = $("inspect-channel").value.trim();
    if (channel) select(channel);
  });
  start();
});
