// libFuzzer target: the input is the text of a model.safetensors.index.json.
// The parser must accept it or throw CheckpointError; anything else is a
// finding. An accepted index must also survive dump -> parse unchanged.
#include <d9d/model_state/io/source.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace d9d::model_state;
  const std::string text(reinterpret_cast<const char*>(data), size);
  SafetensorsIndex index;
  try {
    index = parse_safetensors_index(text, "<fuzz input>");
  } catch (const CheckpointError&) {
    return 0;
  }
  for (const auto& [key, shard] : index.weight_map) {
    if (shard.empty() || shard == "." || shard == ".." || shard.find('/') != std::string::npos ||
        shard.find('\\') != std::string::npos) {
      std::fprintf(stderr, "accepted shard name that is not a plain file name\n");
      std::abort();
    }
  }
  // Our own writer's output must read back as the same index.
  const SafetensorsIndex again = parse_safetensors_index(dump_safetensors_index(index), "<dumped index>");
  if (again.weight_map != index.weight_map || again.total_size != index.total_size) {
    std::fprintf(stderr, "index changed across dump -> parse\n");
    std::abort();
  }
  return 0;
}
