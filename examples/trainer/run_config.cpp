#include "run_config.h"

#include <d9d/peft/errors.h>

#include <fstream>
#include <initializer_list>
#include <sstream>

namespace trainer {

using d9d::peft::ConfigError;
using nlohmann::json;

namespace {

std::string join(const std::string& path, const std::string& field) { return path.empty() ? field : path + "." + field; }

/// One JSON object of the config: rejects fields it does not know, reads the
/// ones present into their destinations.
class Section {
 public:
  Section(const json& j, std::string path, std::initializer_list<const char*> fields) : j_(j), path_(std::move(path)) {
    if (!j.is_object()) throw ConfigError(path_, "expected an object, got " + j.dump());
    std::string allowed;
    for (const char* f : fields) allowed += std::string(allowed.empty() ? "" : ", ") + f;
    for (const auto& item : j.items()) {
      bool known = false;
      for (const char* f : fields) known = known || item.key() == f;
      if (!known) throw ConfigError(join(path_, item.key()), "unknown field; allowed fields are " + allowed);
    }
  }

  const json* find(const char* field) const {
    auto it = j_.find(field);
    return it == j_.end() ? nullptr : &*it;
  }
  std::string path(const char* field) const { return join(path_, field); }

  void integer(const char* field, int64_t& out, int64_t min, int64_t max = INT64_MAX) const {
    const json* v = find(field);
    if (!v) return;
    if (!v->is_number_integer()) throw ConfigError(path(field), "expected an integer, got " + v->dump());
    const int64_t x = v->get<int64_t>();
    if (x < min || x > max) {
      throw ConfigError(path(field), "must be in [" + std::to_string(min) + ", " +
                                         (max == INT64_MAX ? std::string("inf") : std::to_string(max)) + "], got " +
                                         v->dump());
    }
    out = x;
  }
  void positive_number(const char* field, double& out, bool allow_zero) const {
    const json* v = find(field);
    if (!v) return;
    if (!v->is_number()) throw ConfigError(path(field), "expected a number, got " + v->dump());
    const double x = v->get<double>();
    if (allow_zero ? !(x >= 0) : !(x > 0)) {
      throw ConfigError(path(field), std::string(allow_zero ? "must be >= 0" : "must be > 0") + ", got " + v->dump());
    }
    out = x;
  }
  void string(const char* field, std::string& out, bool nullable) const {
    const json* v = find(field);
    if (!v) return;
    if (nullable && v->is_null()) {
      out.clear();
      return;
    }
    if (!v->is_string()) {
      throw ConfigError(path(field), std::string("expected a string") + (nullable ? " or null" : "") + ", got " + v->dump());
    }
    out = v->get<std::string>();
  }

 private:
  const json& j_;
  std::string path_;
};

/// `finetune` (with `save_every`) when `finetune` is given, else `pretrain`.
void parse_optim(const Section& parent, const char* field, OptimConfig& out, FinetuneConfig* finetune = nullptr) {
  const json* v = parent.find(field);
  if (!v) return;
  const std::initializer_list<const char*> fields = {"steps", "batch_size", "lr", "weight_decay", "warmup_steps",
                                                     "max_grad_norm"};
  const std::initializer_list<const char*> finetune_fields = {"steps",        "batch_size",    "lr",        "weight_decay",
                                                              "warmup_steps", "max_grad_norm", "save_every"};
  Section s(*v, parent.path(field), finetune ? finetune_fields : fields);
  s.integer("steps", out.steps, 0);
  s.integer("batch_size", out.batch_size, 1, 1 << 16);
  s.positive_number("lr", out.lr, false);
  s.positive_number("weight_decay", out.weight_decay, true);
  s.integer("warmup_steps", out.warmup_steps, 0);
  s.positive_number("max_grad_norm", out.max_grad_norm, true);
  if (finetune) s.integer("save_every", finetune->save_every, 0);
}

nlohmann::ordered_json optim_json(const OptimConfig& c) {
  return {{"steps", c.steps},
          {"batch_size", c.batch_size},
          {"lr", c.lr},
          {"weight_decay", c.weight_decay},
          {"warmup_steps", c.warmup_steps},
          {"max_grad_norm", c.max_grad_norm}};
}

nlohmann::ordered_json finetune_json(const FinetuneConfig& c) {
  nlohmann::ordered_json j = optim_json(c);
  j["save_every"] = c.save_every;
  return j;
}

}  // namespace

RunConfig default_config() {
  RunConfig c;
  c.pretrain.steps = 400;
  c.pretrain.weight_decay = 0.01;
  c.pretrain.warmup_steps = 50;
  c.finetune.steps = 600;
  c.finetune.warmup_steps = 20;
  // Reversing is a change of positions: adapt the position embedding as well
  // as every projection.
  c.peft = d9d::peft::LoRAConfig{".*_proj|embed_positions", d9d::peft::LoRAParameters().r(8).alpha(16)};
  return c;
}

RunConfig parse_run_config(const json& j, RunConfig c) {
  Section root(j, "",
               {"name", "seed", "device", "threads", "base_checkpoint", "log_every", "task", "model", "pretrain", "finetune",
                "peft"});
  root.string("name", c.name, false);
  if (const json* v = root.find("seed")) {
    if (!v->is_number_unsigned()) throw ConfigError("seed", "expected an integer >= 0, got " + v->dump());
    c.seed = v->get<uint64_t>();
  }
  root.string("device", c.device, false);
  root.integer("threads", c.threads, 0, 1024);
  root.string("base_checkpoint", c.base_checkpoint, true);
  root.integer("log_every", c.log_every, 1);
  if (const json* v = root.find("task")) {
    Section s(*v, "task", {"symbols", "length", "eval_sequences"});
    s.integer("symbols", c.task.symbols, 2, 4096);
    s.integer("length", c.task.length, 1, 512);
    s.integer("eval_sequences", c.task.eval_sequences, 1);
  }
  if (const json* v = root.find("model")) {
    Section s(*v, "model", {"d_model", "n_layers", "n_heads", "d_ff", "moe"});
    s.integer("d_model", c.model.d_model, 1);
    s.integer("n_layers", c.model.n_layers, 1);
    s.integer("n_heads", c.model.n_heads, 1);
    s.integer("d_ff", c.model.d_ff, 1);
    if (const json* m = s.find("moe")) {
      if (m->is_null()) {
        c.model.moe.reset();
      } else {
        Section moe(*m, "model.moe", {"experts", "top_k"});
        MoeConfig parsed;
        moe.integer("experts", parsed.experts, 1, 4096);
        moe.integer("top_k", parsed.top_k, 1, 4096);
        c.model.moe = parsed;
      }
    }
  }
  parse_optim(root, "pretrain", c.pretrain);
  parse_optim(root, "finetune", c.finetune, &c.finetune);
  if (const json* v = root.find("peft")) {
    try {
      c.peft = v->get<d9d::peft::AnyPeftConfig>();
    } catch (const ConfigError& e) {
      // Re-root the library's path (`params.r`) under `peft`.
      const std::string what = e.what();
      const std::string rule = e.path().empty() ? what : what.substr(e.path().size() + 2);
      throw ConfigError(join("peft", e.path()), rule);
    }
  }
  validate(c);
  return c;
}

void validate(const RunConfig& c) {
  if (c.name.empty() || c.name.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") !=
                            std::string::npos ||
      c.name == "." || c.name == "..") {
    throw ConfigError("name", "must be a non-empty directory name of letters, digits, '.', '_' or '-', got " +
                                  json(c.name).dump(-1, ' ', false, json::error_handler_t::replace));
  }
  // A path from the config reaches the operating system, where a NUL would end it early.
  for (const char ch : c.base_checkpoint) {
    if (static_cast<unsigned char>(ch) < 0x20 || ch == 0x7f) {
      throw ConfigError("base_checkpoint", "must be a path without control characters, got " +
                                               json(c.base_checkpoint).dump(-1, ' ', false, json::error_handler_t::replace));
    }
  }
  const bool cuda = c.device == "cuda" || (c.device.rfind("cuda:", 0) == 0 && c.device.size() > 5 &&
                                          c.device.find_first_not_of("0123456789", 5) == std::string::npos);
  if (c.device != "cpu" && !cuda) throw ConfigError("device", "must be \"cpu\", \"cuda\" or \"cuda:N\", got \"" + c.device + "\"");
  if (c.model.d_model % c.model.n_heads != 0) {
    throw ConfigError("model.n_heads", "must divide model.d_model (" + std::to_string(c.model.d_model) + "), got " +
                                           std::to_string(c.model.n_heads));
  }
  if (c.model.moe && c.model.moe->top_k > c.model.moe->experts) {
    throw ConfigError("model.moe.top_k", "must be at most model.moe.experts (" + std::to_string(c.model.moe->experts) +
                                             "): each token goes to top_k different experts, got " +
                                             std::to_string(c.model.moe->top_k));
  }
  d9d::peft::validate(c.peft, "peft");
}

RunConfig load_run_config(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error(path + ": cannot open the config file");
  std::stringstream text;
  text << in.rdbuf();
  json j;
  try {
    j = json::parse(text.str());
  } catch (const json::exception& e) {  // parse_error, and out_of_range for a number beyond double (1e400)
    throw std::runtime_error(path + ": not valid JSON: " + e.what());
  }
  try {
    return parse_run_config(j);
  } catch (const ConfigError& e) {
    throw std::runtime_error(path + ": " + e.what());
  }
}

nlohmann::ordered_json to_json(const RunConfig& c) {
  nlohmann::ordered_json peft;
  d9d::peft::to_json(peft, c.peft);
  return {{"name", c.name},
          {"seed", c.seed},
          {"device", c.device},
          {"threads", c.threads},
          {"base_checkpoint", c.base_checkpoint.empty() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(c.base_checkpoint)},
          {"log_every", c.log_every},
          {"task", {{"symbols", c.task.symbols}, {"length", c.task.length}, {"eval_sequences", c.task.eval_sequences}}},
          {"model",
           {{"d_model", c.model.d_model},
            {"n_layers", c.model.n_layers},
            {"n_heads", c.model.n_heads},
            {"d_ff", c.model.d_ff},
            {"moe", c.model.moe ? nlohmann::ordered_json{{"experts", c.model.moe->experts}, {"top_k", c.model.moe->top_k}}
                                : nlohmann::ordered_json(nullptr)}}},
          {"pretrain", optim_json(c.pretrain)},
          {"finetune", finetune_json(c.finetune)},
          {"peft", peft}};
}

}  // namespace trainer
