// The real centrifuge-js SDK, driven by a test over stdin/stdout (one JSON object a line).
// `node driver.mjs URL TOKEN [json|protobuf]`: it connects (with the SDK's JSON build, or
// its Protobuf build, `centrifuge/build/protobuf`), then runs commands it reads
// ({"op": "subscribe", "channel": ..., "delta"?: "fossil"}, "publish", "history",
// "presence", "unsubscribe", "stats", "disconnect", "exit") and prints every event the SDK
// gives the app. Payloads are JSON to the test either way: the Protobuf build carries bytes,
// which the driver encodes and decodes as UTF-8 JSON.
import readline from "node:readline";
import WebSocket from "ws";

const [url, token, encoding = "json"] = process.argv.slice(2);
const binary = encoding === "protobuf";
const { Centrifuge } = await import(binary ? "centrifuge/build/protobuf" : "centrifuge");
const say = (event) => process.stdout.write(JSON.stringify(event) + "\n");
const decode = (data) => (binary ? JSON.parse(new TextDecoder().decode(data)) : data);
const encode = (data) => (binary ? new TextEncoder().encode(JSON.stringify(data)) : data);

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
client.on("publication", (ctx) => say({ event: "personal", channel: ctx.channel, data: decode(ctx.data), tags: ctx.tags }));
client.on("error", (ctx) => say({ event: "error", type: ctx.type, code: ctx.error?.code }));

function subscribe(channel, delta) {
  const sub = client.newSubscription(channel, delta ? { delta } : {});
  sub.on("subscribed", (ctx) => say({
    event: "subscribed", channel, recovered: ctx.recovered, wasRecovering: ctx.wasRecovering,
    recoverable: ctx.recoverable, offset: ctx.streamPosition?.offset, epoch: ctx.streamPosition?.epoch,
  }));
  sub.on("subscribing", (ctx) => say({ event: "subscribing", channel, code: ctx.code }));
  sub.on("unsubscribed", (ctx) => say({ event: "unsubscribed", channel, code: ctx.code }));
  sub.on("publication", (ctx) => say({
    event: "publication", channel, data: decode(ctx.data), offset: ctx.offset, user: ctx.info?.user ?? null,
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
    if (op === "subscribe") subscribe(channel, command.delta);
    else if (op === "unsubscribe") sub().unsubscribe();
    else if (op === "publish") await sub().publish(encode(command.data));
    else if (op === "stats") say({ event: "stats", channel, ...sub().deltaStats() });
    else if (op === "history") {
      const result = await client.history(channel, { limit: command.limit ?? 0 });
      say({ event: "history", offset: result.offset, data: result.publications.map((p) => decode(p.data)) });
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
