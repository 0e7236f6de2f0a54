"""Side by side with the engines a user would pick instead (``fila bench --peers``): our LLM graphs
against llama.cpp and onnxruntime-genai, each converted from the checkpoint's own LLM weights, on
the same token ids, at the same thread count, in fresh processes taking turns."""
