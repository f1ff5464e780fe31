"""A runtime's refusal of an ONNX file, said in one line that keeps its reason."""

from cras_jax.deploy import run_onnx

SIGNATURE = (
    "Exception from src/inference/src/cpp/core.cpp:97:\n"
    + "ov::Model ov::frontend::onnx::FrontEnd::convert(const std::shared_ptr<"
    + "ov::frontend::InputModel>& model) const " * 8
    + "\n"
)


def test_the_opset_or_ir_reason_survives_a_long_cpp_signature():
  e = RuntimeError(SIGNATURE + "Unsupported model IR version: 11, max supported IR version: 10\n")
  said = run_onnx.runtime_reason(e)
  assert "Unsupported model IR version: 11, max supported IR version: 10" in said
  assert "\n" not in said and len(said) <= 403


def test_without_a_named_reason_the_end_of_the_message_is_kept():
  e = RuntimeError("x" * 1000 + " the last words")
  said = run_onnx.runtime_reason(e)
  assert said.endswith("the last words") and said.startswith("...") and len(said) == 403
  assert run_onnx.runtime_reason(RuntimeError("")) == "RuntimeError"
