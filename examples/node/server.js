// server.js: a sockherd worker in Node.js, speaking the IPC protocol (docs/protocol.md).
// command = ["node", "server.js"]; tested by tests/integration/test_node_worker.py.
const http = require("http");
const net = require("net");
const fs = require("fs");

const socketPath = process.env.SOCKHERD_SOCKET;
const server = http.createServer((req, res) => {
  res.end(`hello from node worker ${process.env.SOCKHERD_WORKER_ID} (pid ${process.pid})\n`);
});
server.keepAliveTimeout = 75_000; // longer than nginx's keepalive_timeout (60 s)

const received = []; // messages from `sockherd send-msg`
// Request handlers for `sockherd send-req NAME`: return a value, or an array to stream.
const handlers = {
  pid: () => ({ pid: process.pid, runtime: "node" }),
  count: () => ({ stream: [1, 2, 3] }),
  messages: () => received,
};

let ipc = null;
function send(obj) { if (ipc) ipc.write(JSON.stringify(obj) + "\n"); }

function answer(msg) {
  const handler = handlers[msg.data && msg.data.name];
  if (!handler) {
    send({ type: "reply", request_id: msg.id, done: true, errors: [`no handler for request ${JSON.stringify(msg.data && msg.data.name)}`] });
    return;
  }
  try {
    const result = handler(msg.data.data);
    if (result && Array.isArray(result.stream)) {
      for (const item of result.stream) send({ type: "reply", request_id: msg.id, data: item, done: false });
      send({ type: "reply", request_id: msg.id, done: true });
    } else {
      send({ type: "reply", request_id: msg.id, data: result, done: true });
    }
  } catch (err) {
    send({ type: "reply", request_id: msg.id, done: true, errors: [`handler raised ${err}`] });
  }
}

function shutdown() {
  // Stop accepting, finish in-flight requests, close idle keep-alive connections.
  server.close(() => process.exit(0));
  server.closeIdleConnections();
}

function connectIpc(onReady) {
  ipc = net.createConnection(process.env.SOCKHERD_IPC, () => {
    send({ type: "hello", id: 1, data: { role: "worker", id: process.env.SOCKHERD_WORKER_ID, pid: process.pid, version: 1 } });
  });
  let buffer = "";
  ipc.on("data", (chunk) => {
    buffer += chunk;
    let nl;
    while ((nl = buffer.indexOf("\n")) >= 0) {
      const msg = JSON.parse(buffer.slice(0, nl));
      buffer = buffer.slice(nl + 1);
      if (msg.type === "reply" && msg.request_id === 1) {
        if (msg.errors) { console.error("sockherd refused us:", msg.errors); ipc.end(); ipc = null; }
        else onReady();
      } else if (msg.type === "shutdown") {
        if (msg.id !== undefined) send({ type: "reply", request_id: msg.id, done: true });
        shutdown();
      } else if (msg.type === "message") {
        received.push([msg.data.name, msg.data.data === undefined ? null : msg.data.data]);
      } else if (msg.type === "request") {
        answer(msg);
      }
    }
  });
  ipc.on("error", () => {});
}

process.on("SIGTERM", shutdown); // stop_signal, and the daemon's SIGTERM escalation

try { fs.unlinkSync(socketPath); } catch {}
server.listen({ path: socketPath, backlog: Number(process.env.SOCKHERD_BACKLOG || 511) }, () => {
  fs.chmodSync(socketPath, parseInt(process.env.SOCKHERD_SOCKET_MODE || "660", 8));
  connectIpc(() => send({ type: "online" }));
});
