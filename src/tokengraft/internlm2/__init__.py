"""InternLM2 folders read and written without their remote code.

InternLM2 (``model_type: internlm2``) is the Llama architecture with renamed weights and a packed
attention projection; its hub folders ship ``modeling_internlm2.py`` / ``tokenization_internlm2.py``
that transformers would only run with ``trust_remote_code``. Here those files are data: the weights
are renamed and unpacked into a :class:`transformers.LlamaForCausalLM`, and the sentencepiece
``tokenizer.model`` becomes a transformers Llama tokenizer that encodes exactly as InternLM2's own
tokenizer does (sentencepiece on each stretch of text between special tokens).

``to_llama`` / ``from_llama`` are pure maps between the two key layouts (bit-exact both ways), so
convert, export and the XTuner importer can reuse them on raw state dicts.

The package, along the seams: ``config`` (config.json -> LlamaConfig), ``weights`` (key layouts,
packed ``wqkv``, reading weight files), ``tokenizer`` (sentencepiece, exact), ``folder`` (load a folder,
write one back).
"""
from .config import MODEL_TYPE, InternLM2Error, check_config, is_internlm2, is_internlm2_folder, llama_config
from .folder import bridge_source, export_internlm2, load_folder, save_folder
from .tokenizer import load_tokenizer, sp_reference_ids
from .weights import from_llama, pack_wqkv, read_weights, to_llama, unpack_wqkv, weight_files

__all__ = ["MODEL_TYPE", "InternLM2Error", "check_config", "is_internlm2", "is_internlm2_folder", "llama_config", "bridge_source",
           "export_internlm2", "load_folder", "save_folder", "load_tokenizer", "sp_reference_ids",
           "from_llama", "pack_wqkv", "read_weights", "to_llama", "unpack_wqkv", "weight_files"]
