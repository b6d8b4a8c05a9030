// Socket.IO 4 on Node 20 with its Redis adapter: the peer the hub is measured against, set up
// as its users run it for fan-out. One process per node: `node server.mjs PORT [REDIS_URL]`.
// A client connects over WebSocket (`/socket.io/?EIO=4&transport=websocket`), sends
// `subscribe` with a channel and joins that room (with an ack when it asks for one:
// `421["subscribe","<channel>"]` is answered `431[]` once joined, so a client knows it will
// get what is published from then on); `POST /api/publish {"channel", "data"}` emits
// `message` with `data` to the room, on every node through the adapter (Redis pub/sub), and
// answers `{}` with a Content-Length (a keep-alive client then needs no chunked parsing);
// `POST /api/send {"user", "data"}` does the same to the room `@<user>`; `POST /api/batch
// {"commands": [{"publish": {"channel", "data"}} | {"send": {"user", "data"}}, ...]}` (the
// hub's body) emits each in order and answers `{"replies": [{}, ...]}`, one per command, so
// the benchmark's `--batch` costs both one request and one response for B messages.
// Prints `listening PORT` once it serves.
import http from "node:http";
import { Server } from "socket.io";
import { createAdapter } from "@socket.io/redis-adapter";
import { createClient } from "redis";

const port = Number(process.argv[2] ?? 0);
const redisUrl = process.argv[3];

const server = http.createServer((request, response) => {
  if (request.method === "POST" && request.url === "/api/publish") {
    const chunks = [];
    request.on("data", (chunk) => chunks.push(chunk));
    request.on("end", () => {
      const { channel, data } = JSON.parse(Buffer.concat(chunks).toString());
      io.to(channel).emit("message", data);
      response.writeHead(200, { "content-type": "application/json", "content-length": 2 });
      response.end("{}");
    });
    return;
  }
  if (request.method === "POST" && request.url === "/api/send") {
    // a user's personal room, `@<user>` (the benchmark's --personal: a client joins its own)
    const chunks = [];
    request.on("data", (chunk) => chunks.push(chunk));
    request.on("end", () => {
      const { user, data } = JSON.parse(Buffer.concat(chunks).toString());
      io.to(`@${user}`).emit("message", data);
      response.writeHead(200, { "content-type": "application/json", "content-length": 2 });
      response.end("{}");
    });
    return;
  }
  if (request.method === "POST" && request.url === "/api/batch") {
    const chunks = [];
    request.on("data", (chunk) => chunks.push(chunk));
    request.on("end", () => {
      const { commands } = JSON.parse(Buffer.concat(chunks).toString());
      for (const { publish, send } of commands) {
        if (publish) io.to(publish.channel).emit("message", publish.data);
        else io.to(`@${send.user}`).emit("message", send.data);
      }
      const body = `{"replies":[${Array(commands.length).fill("{}").join(",")}]}`;
      response.writeHead(200, {
        "content-type": "application/json", "content-length": Buffer.byteLength(body),
      });
      response.end(body);
    });
    return;
  }
  if (request.url === "/readyz") {
    response.writeHead(200).end("{}");
    return;
  }
  response.writeHead(404).end();
});

const io = new Server(server, { transports: ["websocket"], perMessageDeflate: false });
if (redisUrl) {
  const publisher = createClient({ url: redisUrl });
  const subscriber = publisher.duplicate();
  await Promise.all([publisher.connect(), subscriber.connect()]);
  io.adapter(createAdapter(publisher, subscriber));
}
io.on("connection", (socket) => {
  socket.on("subscribe", (channel, ack) => {
    socket.join(channel);
    if (typeof ack === "function") ack();
  });
});

server.listen(port, "127.0.0.1", () => {
  process.stdout.write(`listening ${server.address().port}\n`);
});
process.on("SIGTERM", () => process.exit(0));
