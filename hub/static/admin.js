// hub admin page (PROTOCOL §12): the HTTP API only, refreshed every REFRESH_MS.
// Every URL is relative to the page (<root>/admin), so the page works under a mount.
// Text from the API is put in the page with textContent only, never as HTML.
"use strict";

const REFRESH_MS = 1500;
const HISTORY_LIMIT = 20;
const KEY_STORAGE = "hub.apiKey";
const CHART_SECONDS = 300; // what the rate charts show
const RATE_WINDOW_S = 15; // a node's rate: its counters over about this long
const CONNECTIONS_PAGE = 100;
const CONNECTIONS_MAX = 1000; // what the API gives in one call

const state = {
  key: sessionStorage.getItem(KEY_STORAGE),
  selected: null,
  timer: null,
  generation: 0, // the latest refresh; only it schedules the next one
  namespaces: null, // name -> options (GET api/namespaces), read once per sign-in
  counters: new Map(), // node -> [{t, started, published, delivered, accepted}], oldest first
  series: [], // [{t (ms), published, delivered, connections}], the charts' points
  connectionsLimit: CONNECTIONS_PAGE,
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
    const stateName = node.state || "ready";
    const stateClass = stateName === "ready" ? "ready" : stateName === "draining" ? "draining" : "down";
    tr.append(
      cell(node.node, "mono"),
      cell(stateName, "state " + stateClass),
      cell(node.version || "–", "mono"),
      cell(node.address || "–", "mono"),
      cell(node.connections, "num"),
      cell(node.users, "num"),
      cell(node.subscriptions, "num"),
      cell(node.channels, "num"),
      cell(duration(node.updated - node.started), "num"),
      cell(node.rss ? bytes(node.rss) : "–", "num"),
      cell(node.cpu === undefined ? "–" : node.cpu.toFixed(1) + " %", "num"),
      cell(duration(now - node.updated) + " ago", "num"),
    );
    return tr;
  });
  fillTable("nodes", rows);
  showNodeChoices(stats.nodes.map((node) => node.node));
  recordRates(stats);
}

function bytes(count) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = count;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return (unit ? value.toFixed(1) : String(value)) + " " + units[unit];
}

function showNodeChoices(nodes) {
  const select = $("conn-node");
  const known = [...select.options].slice(1).map((option) => option.value);
  if (known.join("\n") === nodes.join("\n")) return;
  const chosen = select.value;
  const options = nodes.map((node) => {
    const option = document.createElement("option");
    option.value = node;
    option.textContent = node;
    return option;
  });
  select.replaceChildren(select.options[0], ...options);
  select.value = nodes.includes(chosen) ? chosen : "";
}

// --- rates ---------------------------------------------------------------------------------
// Each node's counters change with its heartbeat (this node's at every call); a node's rate
// is the change of its counters over the last RATE_WINDOW_S of its own clock (`updated`),
// and the cluster's is the sum over the live nodes.

function recordRates(stats) {
  const live = new Set();
  const rates = { published: 0, delivered: 0 };
  for (const node of stats.nodes) {
    live.add(node.node);
    let points = state.counters.get(node.node) || [];
    const last = points[points.length - 1];
    if (last && (last.started !== node.started || last.published > (node.published || 0))) {
      points = []; // restarted: its counters began again
    }
    if (!last || last.t !== node.updated || points.length === 0) {
      points.push({ t: node.updated, started: node.started, published: node.published || 0,
                    delivered: node.delivered || 0 });
    }
    while (points.length > 2 && points[1].t <= node.updated - RATE_WINDOW_S) points.shift();
    state.counters.set(node.node, points);
    const first = points[0];
    const newest = points[points.length - 1];
    if (newest.t > first.t) {
      rates.published += (newest.published - first.published) / (newest.t - first.t);
      rates.delivered += (newest.delivered - first.delivered) / (newest.t - first.t);
    }
  }
  for (const node of [...state.counters.keys()]) {
    if (!live.has(node)) state.counters.delete(node);
  }
  const now = Date.now();
  state.series.push({ t: now, published: rates.published, delivered: rates.delivered,
                      connections: stats.total.connections });
  while (state.series.length && state.series[0].t < now - CHART_SECONDS * 1000) {
    state.series.shift();
  }
  drawCharts();
}

function rateText(value) {
  return value >= 100 ? Math.round(value).toString() : value.toFixed(value >= 10 ? 1 : 2);
}

function drawCharts() {
  const latest = state.series[state.series.length - 1];
  if (latest === undefined) return;
  $("rate-published").textContent = rateText(latest.published);
  $("rate-delivered").textContent = rateText(latest.delivered);
  $("rate-connections").textContent = latest.connections;
  drawChart($("chart-published"), "published", "#2f6fdf");
  drawChart($("chart-delivered"), "delivered", "#1f9d55");
  drawChart($("chart-connections"), "connections", "#c27c0e");
}

function drawChart(canvas, key, color) {
  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(1, Math.round(canvas.clientWidth * ratio));
  const height = Math.max(1, Math.round(canvas.clientHeight * ratio));
  if (canvas.width !== width || canvas.height !== height) {
    canvas.width = width;
    canvas.height = height;
  }
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, width, height);
  const points = state.series;
  if (points.length === 0) return;
  const top = Math.max(1, ...points.map((point) => point[key]));
  const now = Date.now();
  const pad = 4 * ratio;
  // The last CHART_SECONDS, or, until the page has watched that long, what it has seen
  // (a minute at least), so the first minutes are not a sliver at the right edge.
  const span = Math.min(CHART_SECONDS * 1000, Math.max(60_000, now - points[0].t));
  const x = (t) => width - ((now - t) / span) * width;
  const y = (value) => height - pad - (value / top) * (height - 2 * pad - 12 * ratio);
  context.font = `${11 * ratio}px sans-serif`;
  context.fillStyle = "#6b7385";
  context.fillText("max " + rateText(top), pad, 12 * ratio);
  canvas.dataset.points = String(points.length);
  if (points.length < 2) return;
  context.beginPath();
  points.forEach((point, index) => {
    if (index === 0) context.moveTo(x(point.t), y(point[key]));
    else context.lineTo(x(point.t), y(point[key]));
  });
  context.strokeStyle = color;
  context.lineWidth = 2 * ratio;
  context.stroke();
  context.lineTo(x(points[points.length - 1].t), height);
  context.lineTo(x(points[0].t), height);
  context.closePath();
  context.globalAlpha = 0.12;
  context.fillStyle = color;
  context.fill();
  context.globalAlpha = 1;
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

const OFF = new ApiError(403, "forbidden", "off for this channel's namespace");

function namespaceOf(channel) {
  // What the node does (Settings.namespace_of): the part before the first ":", if it names
  // a namespace, else the default one.
  const namespaces = state.namespaces || {};
  const colon = channel.indexOf(":");
  if (colon >= 0 && Object.hasOwn(namespaces, channel.slice(0, colon))) {
    return namespaces[channel.slice(0, colon)];
  }
  return namespaces.default || {};
}

async function refreshChannel() {
  const channel = state.selected;
  if (channel === null) return;
  const path = channelPath(channel);
  const options = namespaceOf(channel);
  const hasHistory = options.history_size > 0 && options.history_ttl > 0 && !channel.startsWith("@");
  $("history-remove").hidden = !hasHistory;
  // A namespace without presence or history is not asked: a 403 on every refresh would
  // fill the browser's console.
  const [presence, history] = await Promise.allSettled([
    options.presence ? api("GET", "api/presence/" + path) : Promise.reject(OFF),
    hasHistory ? api("GET", `api/history/${path}?limit=${HISTORY_LIMIT}`) : Promise.reject(OFF),
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
    if (state.namespaces === null) state.namespaces = (await api("GET", "api/namespaces")).namespaces;
    const [stats, channels, connections] = await Promise.all([
      api("GET", "api/stats"),
      api("GET", "api/channels?prefix=" + encodeURIComponent(prefix)),
      api("GET", connectionsPath()),
    ]);
    showStats(stats);
    showChannels(channels);
    showConnections(connections);
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

// --- connections ----------------------------------------------------------------------------

function connectionsPath() {
  const params = new URLSearchParams({ limit: String(state.connectionsLimit) });
  for (const [name, id] of [["user", "conn-user"], ["channel", "conn-channel"], ["node", "conn-node"]]) {
    const value = $(id).value.trim();
    if (value) params.set(name, value);
  }
  return "api/connections?" + params.toString();
}

function since(seconds) {
  if (!seconds) return "–";
  return duration(Date.now() / 1000 - seconds) + " ago";
}

function showConnections(reply) {
  const rows = reply.connections.map((connection) => {
    const tr = document.createElement("tr");
    tr.dataset.client = connection.client;
    const subscriptions = document.createElement("td");
    for (const channel of connection.subscriptions) {
      const chip = document.createElement("span");
      chip.className = "chip";
      chip.dataset.channel = channel;
      const name = document.createElement("span");
      name.textContent = channel;
      const drop = document.createElement("button");
      drop.type = "button";
      drop.className = "unsubscribe";
      drop.title = `unsubscribe ${connection.user} from ${channel}`;
      drop.setAttribute("aria-label", drop.title);
      drop.textContent = "×";
      drop.addEventListener("click", () => unsubscribe(connection, channel));
      chip.append(name, drop);
      subscriptions.append(chip);
    }
    const actions = document.createElement("td");
    const disconnectButton = document.createElement("button");
    disconnectButton.type = "button";
    disconnectButton.className = "ghost danger disconnect";
    disconnectButton.textContent = "Disconnect";
    disconnectButton.addEventListener("click", () => disconnect(connection));
    actions.append(disconnectButton);
    tr.append(
      cell(connection.user),
      cell(connection.client, "mono"),
      cell(connection.node, "mono"),
      cell(connection.remote || "–", "mono"),
      cell(connection.user_agent || "–", "agent"),
      cell(connection.protocol),
      subscriptions,
      cell(since(connection.since), "num"),
      actions,
    );
    return tr;
  });
  fillTable("connections", rows);
  const more = reply.next !== undefined && state.connectionsLimit < CONNECTIONS_MAX;
  $("connections-more").hidden = !more;
  const missing = reply.unanswered && reply.unanswered.length
    ? ` Not answering: ${reply.unanswered.join(", ")}.` : "";
  $("connections-note").textContent = (rows.length
    ? `${rows.length} connection${rows.length === 1 ? "" : "s"}${reply.next ? " (more below)" : ""}.`
    : "No connection matches.") + missing;
}

function confirmed(text) {
  return new Promise((resolve) => {
    $("confirm-text").textContent = text;
    $("confirm").hidden = false;
    $("confirm-yes").focus();
    const answer = (yes) => {
      $("confirm").hidden = true;
      $("confirm-yes").removeEventListener("click", onYes);
      $("confirm-no").removeEventListener("click", onNo);
      resolve(yes);
    };
    const onYes = () => answer(true);
    const onNo = () => answer(false);
    $("confirm-yes").addEventListener("click", onYes);
    $("confirm-no").addEventListener("click", onNo);
  });
}

async function act(question, method, path, body, done) {
  if (!(await confirmed(question))) return;
  try {
    await api(method, path, body);
    showResult("action-result", true, done);
  } catch (error) {
    const missing = error.status === 404 || error.status === 405
      ? " (this hub does not have that API call)" : "";
    showResult("action-result", false, `${error.status} ${error.code}: ${error.message}${missing}`);
  }
  refresh();
}

function disconnect(connection) {
  act(`Disconnect ${connection.user}'s connection ${connection.client} on ${connection.node}?`,
    "POST", "api/disconnect", { user: connection.user, client: connection.client },
    `disconnected ${connection.client} (${connection.user})`);
}

function unsubscribe(connection, channel) {
  act(`Unsubscribe ${connection.user}'s connection ${connection.client} from ${channel}?`,
    "POST", "api/unsubscribe", { user: connection.user, channel, client: connection.client },
    `unsubscribed ${connection.client} (${connection.user}) from ${channel}`);
}

function removeHistory() {
  const channel = state.selected;
  if (channel === null) return;
  act(`Remove the stored messages of ${channel}? Clients that come back later cannot recover what they missed before now.`,
    "DELETE", "api/history/" + channelPath(channel), undefined,
    `removed the history of ${channel}`);
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
  state.namespaces = null;
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
    const config = await (await fetch("admin/config.json", { cache: "no-store" })).json();
    if (!config.needs_key) {
      signedIn(true);
      return;
    }
    if (state.key === null) {
      signedOut(null);
      return;
    }
    await api("GET", "api/stats");
    signedIn(false);
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
  const search = () => { state.connectionsLimit = CONNECTIONS_PAGE; refresh(); };
  $("conn-user").addEventListener("input", search);
  $("conn-channel").addEventListener("input", search);
  $("conn-node").addEventListener("change", search);
  $("connections-form").addEventListener("submit", (event) => { event.preventDefault(); search(); });
  $("connections-more").addEventListener("click", () => {
    state.connectionsLimit = Math.min(CONNECTIONS_MAX, state.connectionsLimit + CONNECTIONS_PAGE);
    refresh();
  });
  $("history-remove").addEventListener("click", removeHistory);
  window.addEventListener("resize", () => { if (state.series.length) drawCharts(); });
  $("inspect-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const channel = $("inspect-channel").value.trim();
    if (channel) select(channel);
  });
  start();
});
