"""Exports of a fine-tuned model for serving engines (docs/serving.md).

* :mod:`torchdora.app.export.gguf`: the merged model as one GGUF file (llama.cpp, Ollama, LM Studio), written by
  ``torchdora merge --format gguf``.
* :mod:`torchdora.app.export.lora`: the rank-R LoRA adapter closest to a DoRA adapter's merged update, in PEFT's
  LoRA format (multi-LoRA servers: vLLM, SGLang, TGI, LoRAX), written by ``torchdora export-lora``.
"""
