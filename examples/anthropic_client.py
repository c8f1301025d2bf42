"""Chat with an exo node through the official Anthropic client (pip install anthropic).

    EXO_URL=http://127.0.0.1:52415 EXO_API_KEY=... python examples/anthropic_client.py "What is the capital of France?"

EXO_API_KEY is needed only when the node has API keys configured (the client sends it as a key
header). Recent SDK versions have no temperature argument; it goes in extra_body.
"""

import os
import sys

from anthropic import Anthropic

base = os.environ.get("EXO_URL", "http://127.0.0.1:52415")
client = Anthropic(base_url=base, api_key=os.environ.get("EXO_API_KEY", "unused"))
prompt = sys.argv[1] if len(sys.argv) > 1 else "What is the capital of France?"
model = os.environ.get("EXO_MODEL", "smollm2-135m")

with client.messages.stream(model=model, max_tokens=64, system="Answer briefly.",
                            messages=[{"role": "user", "content": prompt}], extra_body={"temperature": 0}) as stream:
    for text in stream.text_stream:
        print(text, end="", flush=True)
    final = stream.get_final_message()
print(f"\n[{final.stop_reason}, {final.usage.input_tokens} prompt tokens, {final.usage.output_tokens} generated]")
