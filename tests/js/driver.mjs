// The real centrifuge-js SDK, driven by a test over stdin/stdout (one JSON object a line).
// `node driver.mjs URL TOKEN`: it connects, then runs commands it reads
// ({"op": "subscribe", "channel": ...}, "publish", "history", "presence", "unsubscribe",
// "disconnect", "exit") and prints every event the SDK gives the app.
import readline from "node:readline";
import { Centrifuge } from "centrifuge";
import WebSocket from "ws";

const [url, token] = process.argv.slice(2);
const say = (event) => process.stdout.write(JSON.stringify(event) + "\n");

const client = new Centrifuge(url, {
  websocket: WebSocket,
  token,
  minReconnectDelay: 50,
  maxReconnectDelay: 500,
  getToken: async () => {
    say({ event: "get_token" });
    return token;
  },
});
client.on("connecting", (ctx) => say({ event: "connecting", code: ctx.code, reason: ctx.reason }));
client.on("connected", (ctx) => say({ event: "connected", client: ctx.client }));
client.on("disconnected", (ctx) => say({ event: "disconnected", code: ctx.code, reason: ctx.reason }));
client.on("publication", (ctx) => say({ event: "personal", channel: ctx.channel, data: ctx.data, tags: ctx.tags }));
client.on("error", (ctx) => say({ event: "error", type: ctx.type, code: ctx.error?.code }));

function subscribe(channel) {
  const sub = client.newSubscription(channel);
  sub.on("subscribed", (ctx) => say({
    event: "subscribed", channel, recovered: ctx.recovered, wasRecovering: ctx.wasRecovering,
    recoverable: ctx.recoverable, offset: ctx.streamPosition?.offset, epoch: ctx.streamPosition?.epoch,
  }));
  sub.on("subscribing", (ctx) => say({ event: "subscribing", channel, code: ctx.code }));
  sub.on("unsubscribed", (ctx) => say({ event: "unsubscribed", channel, code: ctx.code }));
  sub.on("publication", (ctx) => say({
    event: "publication", channel, data: ctx.data, offset: ctx.offset, user: ctx.info?.user ?? null,
    tags: ctx.tags ?? null,
  }));
  sub.on("join", (ctx) => say({ event: "join", channel, user: ctx.info.user }));
  sub.on("leave", (ctx) => say({ event: "leave", channel, user: ctx.info.user }));
  sub.subscribe();
}

async function run(command) {
  const { op, channel } = command;
  const sub = () => client.getSubscription(channel);
  try {
    if (op === "subscribe") subscribe(channel);
    else if (op === "unsubscribe") sub().unsubscribe();
    else if (op === "publish") await sub().publish(command.data);
    else if (op === "history") {
      const result = await client.history(channel, { limit: command.limit ?? 0 });
      say({ event: "history", offset: result.offset, data: result.publications.map((p) => p.data) });
    } else if (op === "presence") {
      const result = await client.presence(channel);
      say({ event: "presence", users: Object.values(result.clients).map((c) => c.user).sort() });
    } else if (op === "disconnect") client.disconnect();
    else if (op === "exit") process.exit(0);
  } catch (error) {
    say({ event: "failed", op, code: error?.code ?? null, message: String(error?.message ?? error) });
  }
}

readline.createInterface({ input: process.stdin }).on("line", (line) => run(JSON.parse(line)));
client.connect();
