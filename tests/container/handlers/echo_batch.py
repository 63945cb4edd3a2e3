"""An LMI-style JSON echo handler that handles dynamic batches, written as for DJL Serving.

Each member's answer says which batch it was in, so a test can see batching happen; a member
whose body asks for it raises, to show that the failure stays with that request.
"""

from djl_python import Input, Output

properties = {}


def handle(inputs: Input):
    if inputs.is_empty():  # the init call
        properties.update(inputs.get_properties())
        return None
    batch = inputs.get_batches()
    outputs = Output()
    for index, item in enumerate(batch):
        body = item.get_as_json()
        if body.get("fail"):
            raise ValueError(f"asked to fail: {body['fail']}")
        outputs.add_as_json({"echo": body, "batch_size": len(batch), "model_dir": properties["model_dir"],
                             "batch_option": properties.get("batch_size"),
                             "header": item.get_property("x-echo-header")}, batch_index=index)
        outputs.add_property(f"batch_{index}_X-Echo-Index", str(index))
    return outputs
