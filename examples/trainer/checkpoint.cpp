#include "checkpoint.h"

#include "run_config.h"

#include <d9d/model_state/io/atomic_file.h>
#include <d9d/model_state/io/safetensors.h>
#include <d9d/peft/errors.h>

#include <ATen/ATen.h>

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>

namespace trainer {

namespace fs = std::filesystem;
namespace ms = d9d::model_state;
using nlohmann::ordered_json;

namespace {

constexpr const char* kFormat = "d9d-peft-train checkpoint";
constexpr int kVersion = 1;
constexpr const char* kTrainable = "trainable.safetensors";
constexpr const char* kOptimizer = "optimizer.pt";
constexpr const char* kState = "trainer_state.json";

fs::path new_dir(const fs::path& out) { return out / "checkpoint.new"; }
fs::path old_dir(const fs::path& out) { return out / "checkpoint.old"; }

/// Makes the renames and new entries of directory `dir` durable.
void fsync_dir(const fs::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error(dir.string() + ": cannot open the directory: " + std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) throw std::runtime_error(dir.string() + ": fsync failed: " + std::strerror(err));
}

std::string hex(const at::Tensor& bytes) {
  static const char digits[] = "0123456789abcdef";
  const at::Tensor t = bytes.to(at::kCPU).contiguous();
  if (t.scalar_type() != at::kByte) throw std::runtime_error("a generator state is not a uint8 tensor");
  const uint8_t* p = t.data_ptr<uint8_t>();
  std::string s;
  s.reserve(2 * static_cast<size_t>(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) {
    s += digits[p[i] >> 4];
    s += digits[p[i] & 15];
  }
  return s;
}

std::optional<at::Tensor> unhex(const std::string& s) {
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  if (s.size() % 2 != 0) return std::nullopt;
  at::Tensor t = at::empty({static_cast<int64_t>(s.size() / 2)}, at::kByte);
  uint8_t* p = t.data_ptr<uint8_t>();
  for (size_t i = 0; i < s.size(); i += 2) {
    const int hi = nibble(s[i]), lo = nibble(s[i + 1]);
    if (hi < 0 || lo < 0) return std::nullopt;
    p[i / 2] = static_cast<uint8_t>(hi << 4 | lo);
  }
  return t;
}

std::string read_bytes(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw std::runtime_error(file.string() + ": cannot open: " + std::strerror(errno));
  std::ostringstream bytes;
  bytes << in.rdbuf();
  if (in.bad()) throw std::runtime_error(file.string() + ": cannot read");
  return bytes.str();
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::map<std::string, at::Tensor> trainable_parameters(const torch::nn::Module& model) {
  std::map<std::string, at::Tensor> params;
  for (const auto& item : model.named_parameters()) {
    if (item.value().requires_grad()) params.emplace(item.key(), item.value());
  }
  return params;
}

}  // namespace

fs::path checkpoint_dir(const fs::path& out) { return out / "checkpoint"; }

std::optional<std::string> recover_checkpoint(const fs::path& out) {
  const fs::path dir = checkpoint_dir(out), fresh = new_dir(out), old = old_dir(out);
  std::optional<std::string> what;
  if (fs::exists(old)) {
    if (fs::exists(dir)) {
      fs::remove_all(old);  // the new one was in place: the old one was being removed
      what = "checkpoint: removed " + old.string() + ", left by a run stopped while replacing its checkpoint";
    } else {
      fs::rename(old, dir);  // killed between the two renames: go back to the old one
      fsync_dir(out);
      what = "checkpoint: restored " + dir.string() + " from " + old.string() +
             ", left by a run stopped while replacing its checkpoint";
    }
  }
  if (fs::exists(fresh)) {
    fs::remove_all(fresh);  // never put in place: incomplete, or older than what is in place
    if (!what) what = "checkpoint: removed the incomplete " + fresh.string() + ", left by a run stopped while saving";
  }
  return what;
}

void remove_checkpoint(const fs::path& out) {
  for (const fs::path& p : {new_dir(out), checkpoint_dir(out), old_dir(out)}) fs::remove_all(p);
}

void save_trainable(const fs::path& file, const torch::nn::Module& model) {
  ms::StateDict tensors;
  for (const auto& [key, value] : trainable_parameters(model)) tensors.emplace(key, value.detach());
  ms::save_safetensors(file.string(), tensors, {{"format", "pt"}});
}

void save_checkpoint(const fs::path& out, const torch::nn::Module& model, const TrainingState& state,
                     const ordered_json& config) {
  recover_checkpoint(out);  // a complete checkpoint in place, nothing else
  const fs::path dir = checkpoint_dir(out), fresh = new_dir(out), old = old_dir(out);
  fs::create_directories(fresh);

  save_trainable(fresh / kTrainable, model);
  ms::write_file_atomically((fresh / kOptimizer).string(), state.optimizer);
  const ordered_json j = {{"format", kFormat},
                          {"version", kVersion},
                          {"step", state.step},
                          {"loss", state.loss},
                          {"data_rng", state.data_rng},
                          {"cpu_rng", hex(state.cpu_rng)},
                          {"device_rng", state.device_rng.defined() ? ordered_json(hex(state.device_rng))
                                                                    : ordered_json(nullptr)},
                          {"config", config}};
  ms::write_file_atomically((fresh / kState).string(), j.dump(2) + "\n");
  fsync_dir(fresh);

  // The swap: at every point either `checkpoint` or `checkpoint.old` is complete.
  if (fs::exists(dir)) fs::rename(dir, old);
  fs::rename(fresh, dir);
  fsync_dir(out);
  fs::remove_all(old);
}

Checkpoint read_checkpoint(const fs::path& out) {
  const fs::path dir = checkpoint_dir(out);
  const fs::path state_file = dir / kState;
  if (!fs::exists(state_file)) {
    throw std::runtime_error("--resume: there is no training checkpoint in " + dir.string() + " (no " + kState +
                             "); a fine-tuning run writes one every finetune.save_every steps, when interrupted "
                             "and with --stop-after-step. Run without --resume to fine-tune from the start.");
  }
  const std::string where = state_file.string();
  ordered_json j;
  try {
    j = ordered_json::parse(read_bytes(state_file));
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(where + ": not valid JSON: " + e.what());
  }
  auto field = [&](const char* name) -> const ordered_json& {
    if (!j.is_object() || !j.contains(name)) throw std::runtime_error(where + ": the field \"" + name + "\" is missing");
    return j[name];
  };
  auto bad = [&](const char* name, const std::string& rule) {
    return std::runtime_error(where + ": " + name + ": " + rule + ", got " + j[name].dump());
  };
  if (field("format") != kFormat) throw bad("format", std::string("expected \"") + kFormat + "\"");
  if (field("version") != kVersion) throw bad("version", "this trainer reads version " + std::to_string(kVersion));

  Checkpoint c;
  c.state.origin = dir.string();
  if (!field("step").is_number_integer() || j["step"].get<int64_t>() < 0) throw bad("step", "expected an integer >= 0");
  c.state.step = j["step"].get<int64_t>();
  if (!field("loss").is_number()) throw bad("loss", "expected a number");
  c.state.loss = j["loss"].get<double>();
  if (!field("data_rng").is_string()) throw bad("data_rng", "expected a string");
  c.state.data_rng = j["data_rng"].get<std::string>();
  std::optional<at::Tensor> cpu_rng = field("cpu_rng").is_string() ? unhex(j["cpu_rng"].get<std::string>()) : std::nullopt;
  if (!cpu_rng) throw bad("cpu_rng", "expected a string of hex digits");
  c.state.cpu_rng = *cpu_rng;
  if (!field("device_rng").is_null()) {
    std::optional<at::Tensor> device_rng =
        j["device_rng"].is_string() ? unhex(j["device_rng"].get<std::string>()) : std::nullopt;
    if (!device_rng) throw bad("device_rng", "expected null or a string of hex digits");
    c.state.device_rng = *device_rng;
  }
  // The run config, as the parser reads it (defaults filled in, rules checked),
  // in to_json's form so that it compares field by field with the current one.
  try {
    c.config = to_json(parse_run_config(nlohmann::json::parse(field("config").dump())));
  } catch (const d9d::peft::ConfigError& e) {
    throw std::runtime_error(where + ": config." + e.what());
  }
  c.state.optimizer = read_bytes(dir / kOptimizer);
  c.trainable_file = dir / kTrainable;
  if (!fs::exists(c.trainable_file)) throw std::runtime_error(c.trainable_file.string() + ": missing");
  return c;
}

void load_trainable(const fs::path& file, torch::nn::Module& model) {
  const auto source = ms::SafetensorsFile::open(file.string());
  const auto params = trainable_parameters(model);
  const std::string fix = "; the checkpoint was saved from another model or PEFT config";
  for (const auto& [key, param] : params) {
    if (!source->contains(key)) {
      throw std::runtime_error(file.string() + ": the trainable parameter " + key + " is missing" + fix);
    }
    const ms::SafetensorsEntry& entry = source->header().tensors.at(key);
    if (entry.shape != param.sizes().vec() || entry.dtype != param.scalar_type()) {
      throw std::runtime_error(file.string() + ": " + key + " is " + entry.dtype_name + " " + shape_text(entry.shape) +
                               ", the model's trainable parameter is " + ms::safetensors_dtype_name(param.scalar_type()) +
                               " " + shape_text(param.sizes().vec()) + fix);
    }
  }
  for (const auto& key : source->keys()) {
    if (!params.count(key)) {
      throw std::runtime_error(file.string() + ": " + key + " is not a trainable parameter of the model" + fix);
    }
  }
  at::NoGradGuard no_grad;
  for (const auto& [key, param] : params) {
    at::Tensor p = param;  // shares the parameter's storage
    p.copy_(source->get(key));
  }
  source->verify();
}

std::optional<ConfigDifference> first_difference(const ordered_json& saved, const ordered_json& now,
                                                 const std::string& path) {
  auto join = [&](const std::string& key) { return path.empty() ? key : path + "." + key; };
  if (saved.is_object() && now.is_object()) {
    for (const auto& item : now.items()) {
      if (!saved.contains(item.key())) return ConfigDifference{join(item.key()), "absent", item.value().dump()};
      if (auto d = first_difference(saved[item.key()], item.value(), join(item.key()))) return d;
    }
    for (const auto& item : saved.items()) {
      if (!now.contains(item.key())) return ConfigDifference{join(item.key()), item.value().dump(), "absent"};
    }
    return std::nullopt;
  }
  if (saved.is_array() && now.is_array() && saved.size() == now.size()) {
    for (size_t i = 0; i < now.size(); ++i) {
      if (auto d = first_difference(saved[i], now[i], path + "[" + std::to_string(i) + "]")) return d;
    }
    return std::nullopt;
  }
  if (saved == now) return std::nullopt;
  return ConfigDifference{path.empty() ? std::string("(the whole config)") : path, saved.dump(), now.dump()};
}

}  // namespace trainer
