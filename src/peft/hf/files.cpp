#include <d9d/model_state/io/safetensors.h>
#include <d9d/model_state/io/source.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/hf/files.h>
#include <d9d/peft/registry.h>

#include <fmt/format.h>

#include <filesystem>
#include <fstream>
#include <sstream>

namespace d9d::peft::hf {

namespace fs = std::filesystem;

nlohmann::json parse_adapter_config_text(const std::string& text, const std::string& config_path,
                                         std::string& peft_type) {
  nlohmann::json config;
  try {
    config = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw ConfigError(config_path, fmt::format("not valid JSON: {}", e.what()));
  }
  if (!config.is_object()) throw ConfigError(config_path, "expected a JSON object");
  auto type = config.find("peft_type");
  if (type == config.end() || !type->is_string()) {
    throw ConfigError(config_path + ": peft_type", "field required (a string such as \"LORA\")");
  }
  method_for_peft_type(type->get<std::string>(), config_path);  // throws for a type no method reads
  peft_type = type->get<std::string>();
  return config;
}

AdapterFiles read_adapter_files(const std::string& dir) {
  AdapterFiles files;
  files.dir = dir;
  const fs::path config_path = fs::path(dir) / "adapter_config.json";
  files.config_path = config_path.string();
  std::error_code ec;
  if (!fs::is_directory(dir, ec) || !fs::exists(config_path, ec)) {
    throw PeftError(fmt::format("{}: no adapter_config.json: not an adapter directory (a Hugging Face PEFT adapter "
                                "directory holds adapter_config.json and adapter_model.safetensors)",
                                dir));
  }
  std::ifstream in(config_path, std::ios::binary);
  if (!in) throw model_state::CheckpointError(fmt::format("{}: cannot open", files.config_path));
  std::ostringstream text;
  text << in.rdbuf();
  files.config = parse_adapter_config_text(text.str(), files.config_path, files.peft_type);

  fs::path weights = fs::path(dir) / "adapter_model.safetensors";
  if (!fs::exists(weights, ec) && fs::exists(fs::path(dir) / "adapter_model.bin", ec)) {
    weights = fs::path(dir) / "adapter_model.bin";
  }
  if (!fs::exists(weights, ec)) {
    throw PeftError(fmt::format("{}: no adapter_model.safetensors (nor adapter_model.bin) next to adapter_config.json",
                                dir));
  }
  files.weights_path = weights.string();
  const auto source = model_state::open_checkpoint(files.weights_path);
  for (const auto& key : source->keys()) files.tensors.emplace(key, source->read(key));
  return files;
}

}  // namespace d9d::peft::hf
