// Streams one chat completion from a running Heron server with the official `openai` JS SDK.
//
//   node smoke.mjs BASE_URL [MODEL] [API_KEY]
//
// BASE_URL is the server root (http://127.0.0.1:8000); the SDK gets BASE_URL/v1. Prints one line of
// JSON: {"text", "finish_reason", "chunks"} (chunks exactly as the SDK yielded them), so the Python
// test can check both the answer and every chunk against OpenAI's spec, and "tool_message": the
// message the SDK's own stream accumulator (`chat.completions.stream`) builds from a streamed
// required tool call. Exits non-zero on any error.
import OpenAI from "openai";

const [baseURL, model = "SmolLM2-135M-Instruct", apiKey = "sk-no-key-needed"] = process.argv.slice(2);
if (!baseURL) {
  console.error("usage: node smoke.mjs BASE_URL [MODEL] [API_KEY]");
  process.exit(2);
}

const client = new OpenAI({ baseURL: `${baseURL.replace(/\/$/, "")}/v1`, apiKey, maxRetries: 0, timeout: 60_000 });

try {
  const stream = await client.chat.completions.create({
    model,
    messages: [{ role: "user", content: "What is the capital of France?" }],
    max_tokens: 16,
    temperature: 0,
    stream: true,
    stream_options: { include_usage: true },
  });
  const chunks = [];
  let text = "";
  let finishReason = null;
  for await (const chunk of stream) {
    chunks.push(chunk);
    for (const choice of chunk.choices) {
      text += choice.delta?.content ?? "";
      if (choice.finish_reason) finishReason = choice.finish_reason;
    }
  }
  const weather = {
    type: "function",
    function: {
      name: "get_weather",
      parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
    },
  };
  const toolStream = client.chat.completions.stream({
    model,
    messages: [{ role: "user", content: "What's the weather in Paris?" }],
    tools: [weather],
    tool_choice: "required",
    max_tokens: 40,
    temperature: 0,
  });
  const final = await toolStream.finalChatCompletion();
  const choice = final.choices[0];
  console.log(
    JSON.stringify({ text, finish_reason: finishReason, chunks, tool_message: choice.message, tool_finish_reason: choice.finish_reason }),
  );
} catch (err) {
  console.error(`smoke.mjs: ${err?.constructor?.name ?? "Error"}: ${err?.message ?? err}`);
  process.exit(1);
}
