"""The Gradio chat page, mounted on the ingress at /ui. Replies stream from the engine replicas through
the same Serve handle and the same request checks as the HTTP API (no second copy of the model).
Gradio's chatbot brings the clear, retry (regenerate) and undo buttons."""
import gradio as gr

from serve_app.api import ApiError, engine_request, parse_request


def _text(content):
    """A Gradio history entry's content as plain text (a string, or a list of text parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "")
    return "".join(_text(part) for part in content or [])


def build_ui(engine, config):
    async def respond(message, history, temperature, top_k, max_tokens):
        messages = [{"role": m["role"], "content": _text(m["content"])} for m in history
                    if m.get("role") in ("user", "assistant")]
        messages.append({"role": "user", "content": _text(message)})
        body = {"messages": messages, "temperature": temperature, "top_k": int(top_k) or None,
                "max_tokens": int(max_tokens)}
        try:
            stream, _ = await engine.start(engine_request(parse_request(body, config), config))
        except ApiError as e:
            raise gr.Error(e.message) from None
        reply = ""
        finished = False
        try:
            async for item in stream:
                if "error" in item:
                    raise gr.Error(item["error"])
                reply += item.get("text", "")
                yield reply
            finished = True
        finally:
            if not finished:  # stop button, closed tab: free the batch slot
                stream.cancel()

    controls = [
        gr.Slider(0.0, 2.0, value=0.8, step=0.05, label="Temperature (0 = greedy)", render=False),
        gr.Slider(0, 200, value=50, step=1, label="Top-k (0 = all tokens)", render=False),
        gr.Slider(1, config.max_tokens, value=min(config.default_max_tokens, config.max_tokens), step=1,
                  label="Max tokens", render=False),
    ]
    return gr.ChatInterface(respond, additional_inputs=controls, additional_inputs_accordion="Settings",
                            title="nanochat", description="A small ChatGPT-like model, served by Ray Serve with "
                            "continuous batching.", concurrency_limit=None, fill_height=True, api_visibility="private")
