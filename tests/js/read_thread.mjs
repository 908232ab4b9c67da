// Reads one run of an lcbus thread with LangGraph's JavaScript SDK and prints what
// each projection gave as one JSON line. Usage:
//   node read_thread.mjs <api url> <thread id> <stream token> <sse|websocket>
// It prints {"ready": true} once its subscriptions are open.
import { Client } from "@langchain/langgraph-sdk";
import WebSocket from "ws";

const [apiUrl, threadId, token, transport] = process.argv.slice(2);
const auth = { Authorization: `Bearer ${token}` };

// Over SSE the token rides on every request; over WebSocket the SDK takes no
// headers, so the socket factory sets it on the handshake (node has no browser limits).
const client =
  transport === "websocket" ? new Client({ apiUrl }) : new Client({ apiUrl, defaultHeaders: auth });
// Progress goes to stderr, for the test to show when something is missing.
const log = (...parts) => process.stderr.write(`${parts.join(" ")}\n`);
// The SDK rejects commands in flight when a socket drops, and not every caller
// inside it catches that; log it instead of dying, the result says what arrived.
process.on("unhandledRejection", (error) => log("unhandled rejection:", String(error)));
const options = {
  assistantId: "agent",
  transport,
  onReconnect: ({ attempt, cause }) => log("reconnect", attempt, String(cause)),
  onConnected: ({ kind, attempt }) => log("connected", kind, attempt),
};
if (transport === "websocket") {
  options.webSocketFactory = (url) => new WebSocket(url, { headers: auth });
}
const thread = client.threads.stream(threadId, options);

// A message's text (a tool call's output) resolves while the projection goes on,
// so each is awaited beside the loop.
async function texts(messages, projection) {
  const pending = [];
  for await (const message of messages) {
    log("message", projection, JSON.stringify(message.namespace));
    pending.push((async () => [message.namespace, await message.text])());
  }
  return Promise.all(pending);
}

async function toolCalls() {
  const pending = [];
  for await (const call of thread.toolCalls) {
    pending.push((async () => [call.callId, call.name, call.input, await call.output])());
  }
  return Promise.all(pending);
}

async function subgraphs() {
  const pending = [];
  for await (const sub of thread.subgraphs) {
    pending.push(
      (async () => [sub.namespace, sub.name, (await texts(sub.messages, "subgraph")).map(([, t]) => t)])(),
    );
  }
  return Promise.all(pending);
}

async function progress() {
  const items = [];
  for await (const item of thread.extensions.progress) items.push(item);
  return items;
}

async function events(raw) {
  const items = [];
  for await (const event of raw) {
    log("event", event.seq, event.method, event.params.data.event ?? "");
    // The answer's first word: the test kills a frontend once this has been read.
    if (event.params.namespace.length === 0 && event.params.data.delta?.text === "The") {
      log("answer started");
    }
    items.push(event);
  }
  return items;
}

const work = Promise.all([texts(thread.messages, "thread"), toolCalls(), subgraphs(), progress()]);
// Subscribed last: once the server has answered it, it has answered the projections' too.
const raw = await thread.subscribe(["messages", "tools", "lifecycle", "custom", "tasks"]);
console.log(JSON.stringify({ ready: true }));
const [[messages, tools, subs, extension], all] = await Promise.all([work, events(raw)]);
await thread.close();
console.log(
  JSON.stringify({ messages, tool_calls: tools, subgraphs: subs, progress: extension, events: all }),
);
