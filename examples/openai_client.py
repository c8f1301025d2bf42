"""Chat with an exo node through the official OpenAI client (pip install openai).

    EXO_URL=http://127.0.0.1:52415 EXO_API_KEY=... python examples/openai_client.py "What is the capital of France?"

EXO_API_KEY is needed only when the node has API keys configured (auth.api_keys / EXO_API_KEYS).
"""

import os
import sys

from openai import OpenAI

base = os.environ.get("EXO_URL", "http://127.0.0.1:52415")
client = OpenAI(base_url=f"{base}/v1", api_key=os.environ.get("EXO_API_KEY", "unused"))
prompt = sys.argv[1] if len(sys.argv) > 1 else "What is the capital of France?"
model = os.environ.get("EXO_MODEL", "smollm2-135m")

stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                        temperature=0, max_tokens=64, stream=True)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
