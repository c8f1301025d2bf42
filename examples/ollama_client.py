"""Chat with an exo node through the official Ollama client (pip install ollama), as
Open-WebUI-style front ends do.

    EXO_URL=http://127.0.0.1:52415 EXO_API_KEY=... python examples/ollama_client.py "What is the capital of France?"

EXO_API_KEY is needed only when the node has API keys configured; it is sent as a Bearer token.
"""

import os
import sys

from ollama import Client

base = os.environ.get("EXO_URL", "http://127.0.0.1:52415")
key = os.environ.get("EXO_API_KEY")
client = Client(host=base, headers={"Authorization": f"Bearer {key}"} if key else None)
prompt = sys.argv[1] if len(sys.argv) > 1 else "What is the capital of France?"
model = os.environ.get("EXO_MODEL", "smollm2-135m")

print("models:", ", ".join(m.model for m in client.list().models))
for part in client.chat(model=model, messages=[{"role": "user", "content": prompt}], stream=True,
                        options={"temperature": 0, "num_predict": 64}):
    print(part.message.content, end="", flush=True)
print()
