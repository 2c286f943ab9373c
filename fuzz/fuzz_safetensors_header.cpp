// libFuzzer target: the input is a whole safetensors file. The parser must
// accept it or throw CheckpointError; anything else (another exception, a
// crash, a sanitizer report, an accepted header that breaks its own promises)
// is a finding.
#include <d9d/model_state/io/safetensors.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

namespace {

[[noreturn]] void broken(const char* what) {
  std::fprintf(stderr, "accepted header breaks its contract: %s\n", what);
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace d9d::model_state;
  SafetensorsHeader header;
  try {
    header = parse_safetensors_header(data, size, size, "<fuzz input>");
  } catch (const CheckpointError&) {
    return 0;
  }
  // What the reader relies on when it maps tensors.
  if (header.data_offset < 8 || header.data_offset > size) broken("data_offset outside the file");
  const uint64_t data_size = size - header.data_offset;
  uint64_t covered = 0;
  for (const auto& [key, entry] : header.tensors) {
    if (key == "__metadata__") broken("__metadata__ taken as a tensor");
    if (entry.begin > entry.end || entry.end > data_size) broken("offsets outside the data section");
    uint64_t numel = 1;
    for (int64_t d : entry.shape) {
      if (d < 0) broken("negative dimension");
      numel *= static_cast<uint64_t>(d);
    }
    if (numel * c10::elementSize(entry.dtype) != entry.end - entry.begin) broken("size != shape x dtype");
    covered += entry.end - entry.begin;
  }
  if (covered != data_size) broken("tensors do not tile the data section");
  return 0;
}
