// The C++ half of the add_weighted_adapter checks against real PEFT
// (generate_weighted.py writes the cases).
//
//   peft_weighted_tool check CASES --cli D9D_PEFT
//
// First: do this LibTorch's Bernoulli draws from a seeded CPU generator equal
// PyTorch's (OUT/rng_check.safetensors)? Then, for every case: the model with
// the case's adapters loaded, add_weighted_adapter as PEFT was called, and
// the combined adapter's deltas (scale * B @ A per layer) and the logits
// with it active must match PEFT's to 1e-5 · max(1, max |PEFT|); and
// `d9d-peft combine` on the adapter directories must write PEFT's config
// fields and deltas. DARE masks: in the model, drawn from a generator seeded
// as generate_weighted.py seeded PEFT's, in PEFT's order, so they match when
// the draws do; the CLI draws module by module in sorted path order (the
// files do not record the model's), so for DARE with density < 1 it is
// checked for PEFT's config, ranks and shapes only.
#include "../toy_model.h"

#include <d9d/model_state/io/safetensors.h>
#include <d9d/model_state/load.h>
#include <d9d/model_state/mapper/adapters.h>
#include <d9d/peft.h>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/version.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

namespace fs = std::filesystem;
namespace ms = d9d::model_state;
namespace peft = d9d::peft;
using nlohmann::json;

namespace {

constexpr double kTolerance = 1e-5;
constexpr double kFactorTolerance = 1e-4;

json read_json(const fs::path& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open " + path.string());
  return json::parse(in);
}

double max_diff(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return std::numeric_limits<double>::infinity();
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

double relative_diff(const at::Tensor& ours, const at::Tensor& reference) {
  return max_diff(ours, reference) / std::max(1.0, reference.abs().max().item<double>());
}

/// How far a rank-k truncated SVD of a float32 matrix may move between two
/// LAPACKs (OpenBLAS here, MKL under PEFT), relative to max(1, max |delta|):
/// the truncation's subspace moves by about eps·σ₁/(σ_k - σ_{k+1}), so the
/// product by about σ_k times that. `spectrum` holds σ₁ ≥ ... ≥ σ_{k+1} (the
/// untruncated matrix's first k + 1 singular values); with k or fewer
/// (nothing was cut) the bound is 0. CI seed 667324271 (dare_linear_svd)
/// truncated q_proj at σ₈ = 1.1309 with σ₉ = 1.1266 (σ₁ = 3.01): the bound
/// without the factor is 9.5e-5, and the delta moved 1.4e-5; the factor 4
/// leaves room for the rounding of the sums around the SVD.
double truncation_slack(const at::Tensor& spectrum, int64_t k, const at::Tensor& delta) {
  if (spectrum.size(0) <= k) return 0.0;
  const double s1 = spectrum[0].item<double>(), sk = spectrum[k - 1].item<double>();
  const double gap = std::max(sk - spectrum[k].item<double>(), 1e-30);
  return 4.0 * 1.2e-7 * s1 * sk / gap / std::max(1.0, delta.abs().max().item<double>());
}

/// scale * B @ A of each module of an adapter directory ([d, V] for an embedding).
std::map<std::string, at::Tensor> file_deltas(const fs::path& dir) {
  const auto files = peft::hf::read_adapter_files(dir.string());
  const auto config = peft::hf::parse_lora_config(files.config, files.config_path);
  std::map<std::string, at::Tensor> out;
  for (const auto& path : peft::hf::adapted_module_paths(files.tensors, dir.string())) {
    const std::string p = peft::hf::kPeftKeyPrefix + path;
    const double scale = config.select(path)->scale();
    const bool linear = files.tensors.count(p + ".lora_A.weight") > 0;
    const at::Tensor a = files.tensors.at(p + (linear ? ".lora_A.weight" : ".lora_embedding_A"));
    const at::Tensor b = files.tensors.at(p + (linear ? ".lora_B.weight" : ".lora_embedding_B"));
    out[path] = scale * at::matmul(b, a);
  }
  return out;
}

std::map<std::string, at::Tensor> model_deltas(const torch::nn::Module& model, const std::string& name) {
  std::map<std::string, at::Tensor> out;
  for (const auto& e : peft::adapter_layers(model)) {
    if (!e.layer->has_adapter(name)) continue;
    at::Tensor d = e.layer->delta_weight(name);
    out[e.name] = e.module->as<peft::LoRAEmbeddingImpl>() ? d.t() : d;
  }
  return out;
}

/// Adapter `name`'s factors (A, B) on every layer holding it.
std::map<std::string, std::pair<at::Tensor, at::Tensor>> model_factors(const torch::nn::Module& model,
                                                                       const std::string& name) {
  std::map<std::string, std::pair<at::Tensor, at::Tensor>> out;
  for (const auto& e : peft::adapter_layers(model)) {
    if (!e.layer->has_adapter(name)) continue;
    auto params = e.layer->adapter_module(name)->named_parameters();
    const bool linear = params.contains("lora_A.weight");
    out[e.name] = {params[linear ? "lora_A.weight" : "lora_embedding_A"].detach(),
                   params[linear ? "lora_B.weight" : "lora_embedding_B"].detach()};
  }
  return out;
}

std::map<std::string, std::pair<at::Tensor, at::Tensor>> file_factors(const fs::path& dir) {
  const auto files = peft::hf::read_adapter_files(dir.string());
  std::map<std::string, std::pair<at::Tensor, at::Tensor>> out;
  for (const auto& path : peft::hf::adapted_module_paths(files.tensors, dir.string())) {
    const std::string p = peft::hf::kPeftKeyPrefix + path;
    const bool linear = files.tensors.count(p + ".lora_A.weight") > 0;
    out[path] = {files.tensors.at(p + (linear ? ".lora_A.weight" : ".lora_embedding_A")),
                 files.tensors.at(p + (linear ? ".lora_B.weight" : ".lora_embedding_B"))};
  }
  return out;
}

/// PEFT's svd_clamp on this LAPACK's unclamped factors `ours`, first put in the
/// basis of PEFT's unclamped factors `reference` (same call, same SVD, no clamp).
/// An SVD's factors are fixed by the matrix only up to what LAPACK may choose
/// (MKL in the wheel, OpenBLAS on Debian), and the clamp quantile depends on it:
/// - a component whose singular value is apart from its neighbours' is fixed up
///   to its sign, which is aligned with the reference's;
/// - components whose singular values (B's column norms; A's rows are unit)
///   are within 1e-2·σ₁ of each other, zero ones included, are fixed only as a
///   subspace: their summed product B_k A_k must match the reference's, which is
///   checked here (into `failures`), and then the reference's basis is taken.
///   A rank-4 delta truncated to rank 5 (CI seed 231934260) has such a zero
///   component, whose A row is any unit vector orthogonal to the others.
/// `adopted` counts the components taken from the reference.
std::pair<at::Tensor, at::Tensor> clamp_aligned(std::pair<at::Tensor, at::Tensor> ours,
                                                const std::pair<at::Tensor, at::Tensor>& reference, double q,
                                                const std::string& path, std::vector<std::string>& failures,
                                                int& adopted) {
  at::Tensor a = ours.first.clone(), b = ours.second.clone();
  const int64_t r = a.size(0);
  const at::Tensor sigma = b.norm(2, {0});
  const double scale = std::max(sigma.max().item<double>(), 1e-30);
  const auto s = [&](int64_t k) { return sigma[k].item<double>(); };
  for (int64_t first = 0; first < r;) {
    int64_t last = first;  // [first, last]: a cluster of close singular values
    while (last + 1 < r && s(last) - s(last + 1) < 1e-2 * scale) ++last;
    const bool zero = s(last) < 1e-2 * scale;
    if (first == last && !zero) {
      const double dot = (a[first] * reference.first[first]).sum().item<double>() +
                         (b.select(1, first) * reference.second.select(1, first)).sum().item<double>();
      if (dot < 0) {
        a[first].neg_();
        b.select(1, first).neg_();
      }
    } else {
      const auto part = [&](const at::Tensor& bb, const at::Tensor& aa) {
        return at::matmul(bb.slice(1, first, last + 1), aa.slice(0, first, last + 1));
      };
      const at::Tensor mine = part(b, a), theirs = part(reference.second, reference.first);
      const double diff = (mine - theirs).abs().max().item<double>();
      if (diff > kFactorTolerance * scale) {
        failures.push_back(fmt::format("svd_clamp: components {}..{} of {} (singular values within 1e-2 of the largest "
                                       "of each other): max |B A, d9d - peft| = {:.3g} with sigma_1 = {:.3g}",
                                       first, last, path, diff, scale));
      }
      a.slice(0, first, last + 1).copy_(reference.first.slice(0, first, last + 1));
      b.slice(1, first, last + 1).copy_(reference.second.slice(1, first, last + 1));
      adopted += static_cast<int>(last - first + 1);
    }
    first = last + 1;
  }
  const double hi = at::quantile(at::cat({b.flatten(), a.flatten()}), q).item<double>();
  return {a.clamp(-hi, hi), b.clamp(-hi, hi)};
}

peft::WeightedAdapterOptions options_of(const json& call) {
  auto o = peft::WeightedAdapterOptions().combination_type(call.at("combination_type").get<std::string>());
  if (call.contains("density")) o.density(call.at("density").get<double>());
  if (call.contains("majority_sign_method")) o.majority_sign_method(call.at("majority_sign_method").get<std::string>());
  if (call.contains("svd_rank")) o.svd_rank(call.at("svd_rank").get<int64_t>());
  if (call.contains("svd_clamp")) o.svd_clamp(call.at("svd_clamp").get<double>());
  if (call.contains("svd_full_matrices")) o.svd_full_matrices(call.at("svd_full_matrices").get<bool>());
  return o;
}

std::string quote(const fs::path& p) { return "'" + p.string() + "'"; }

/// Whether this LibTorch draws PyTorch's Bernoulli masks from a seeded CPU generator.
bool same_draws(const fs::path& cases, std::string& report) {
  const auto file = ms::SafetensorsFile::open((cases / "rng_check.safetensors").string());
  const uint64_t seed = std::stoull(file->header().metadata.at("seed"));
  const std::vector<std::vector<int64_t>> shapes = {{7, 13}, {64, 256}, {4, 5, 6}};
  const std::vector<double> densities = {0.3, 0.77, 0.5};
  int64_t differing = 0, total = 0;
  for (size_t i = 0; i < shapes.size(); ++i) {
    auto generator = at::make_generator<at::CPUGeneratorImpl>(seed + i);
    const at::Tensor ours = at::bernoulli(at::full(shapes[i], densities[i]), generator);
    const at::Tensor theirs = file->get(fmt::format("mask_{}", i));
    differing += (ours != theirs).sum().item<int64_t>();
    total += ours.numel();
  }
  report = differing == 0 ? fmt::format("identical ({} of {} entries)", total, total)
                          : fmt::format("different ({} of {} entries differ)", differing, total);
  return differing == 0;
}

int clamp_aligned_count = 0;
int gap_widened_count = 0;  // layers whose delta tolerance the SVD's spectral gap widened past kTolerance
double max_gap_slack = 0.0;
int clamp_adopted_count = 0;  // components of svd_clamp factors whose basis only PEFT's LAPACK fixed

std::vector<std::string> check_case(const fs::path& dir, const std::string& cli, bool exact_draws,
                                    const fs::path& scratch) {
  std::vector<std::string> failures;
  const json info = read_json(dir / "config.json");
  const json& s = info.at("sizes");
  const json& call = info.at("call");
  const auto adapters = call.at("adapters").get<std::vector<std::string>>();
  const auto weights = call.at("weights").get<std::vector<double>>();
  const std::string type = call.at("combination_type").get<std::string>();
  const bool draws = type.rfind("dare", 0) == 0 && call.at("density").get<double>() < 1.0;
  auto expect = [&](const std::string& what, const at::Tensor& ours, const at::Tensor& theirs,
                    double tolerance = kTolerance) {
    const double diff = relative_diff(ours, theirs);
    if (!(diff <= tolerance)) {
      failures.push_back(fmt::format("{}: max |d9d - peft| = {:.3g} with max |peft| = {:.3g} (held to {:.3g} "
                                     "relative to max(1, max |peft|))",
                                     what, max_diff(ours, theirs), theirs.abs().max().item<double>(), tolerance));
    }
  };
  const auto peft_deltas = file_deltas(dir / "adapters" / "w");

  // In the model.
  toy::Toy model(toy::ToyConfig{s.at("vocab").get<int64_t>(), s.at("d").get<int64_t>(), s.at("f").get<int64_t>(),
                                s.at("n_layers").get<int64_t>()});
  ms::LoadOptions quiet;
  quiet.progress = nullptr;
  ms::load_model_state((dir / "model.safetensors").string(), *ms::identity_mapper_from_module(*model), *model, quiet);
  model->eval();
  for (const auto& name : adapters) peft::hf::load_adapter(*model, (dir / "adapters" / name).string(), name);
  auto options = options_of(call);
  // PEFT's rank for *svd without svd_rank is max over adapters of max(r, *rank_pattern.values()) from
  // the configs; a model knows only its layers' ranks (documented). Where a config's largest rank is
  // on no layer, the rank PEFT chose is given explicitly.
  const json w_config = read_json(dir / "adapters" / "w" / "adapter_config.json");
  if (type.size() >= 3 && type.compare(type.size() - 3, 3, "svd") == 0 && !call.contains("svd_rank")) {
    options.svd_rank(w_config.at("r").get<int64_t>());
  }
  options.generator(at::make_generator<at::CPUGeneratorImpl>(info.at("seed").get<uint64_t>()));
  peft::add_weighted_adapter(*model, adapters, weights, "w", options);
  // A truncated SVD's deltas are held to kTolerance plus what the spectral gap
  // at the truncation allows (truncation_slack), from the singular values PEFT
  // decomposed (the generator's spectra.safetensors).
  const bool svd = type.size() >= 3 && type.compare(type.size() - 3, 3, "svd") == 0;
  std::map<std::string, double> delta_tolerance;
  for (const auto& [path, delta] : peft_deltas) delta_tolerance[path] = kTolerance;
  if (svd) {
    const auto spectra = ms::SafetensorsFile::open((dir / "spectra.safetensors").string());
    for (const auto& [path, delta] : peft_deltas) {
      const double slack = truncation_slack(spectra->get(path), *options.svd_rank(), delta);
      delta_tolerance[path] += slack;
      if (slack > kTolerance) ++gap_widened_count;
      max_gap_slack = std::max(max_gap_slack, slack);
    }
  }
  if (call.contains("svd_clamp") && (!draws || exact_draws)) {
    // Direct where this LAPACK picks PEFT's signs; else sign-aligned factors clamped as PEFT does.
    bool direct = true;
    const auto ours = model_deltas(*model, "w");
    for (const auto& [path, delta] : peft_deltas) direct = direct && ours.count(path) && relative_diff(ours.at(path), delta) <= kTolerance;
    if (!direct) {
      options.svd_clamp(std::nullopt);
      options.generator(at::make_generator<at::CPUGeneratorImpl>(info.at("seed").get<uint64_t>()));
      peft::add_weighted_adapter(*model, adapters, weights, "w_unclamped", options);
      const auto unclamped = model_factors(*model, "w_unclamped");
      const auto theirs = file_factors(dir / "adapters" / "w");
      const auto theirs_unclamped = file_factors(dir / "adapters" / "w_unclamped");
      for (const auto& [path, ab] : theirs) {
        const auto aligned = clamp_aligned(unclamped.at(path), theirs_unclamped.at(path),
                                           call.at("svd_clamp").get<double>(), path, failures, clamp_adopted_count);
        // SVD factors (not their products) are fixed only as well as the singular values' gaps allow.
        expect("svd_clamp, signs aligned: A of " + path, aligned.first, ab.first, kFactorTolerance);
        expect("svd_clamp, signs aligned: B of " + path, aligned.second, ab.second, kFactorTolerance);
      }
      ++clamp_aligned_count;
      return failures;  // the CLI's factors have this LAPACK's signs too
    }
  }
  if (!draws || exact_draws) {
    const auto ours = model_deltas(*model, "w");
    if (ours.size() != peft_deltas.size()) failures.push_back("the combined adapter is on a different set of layers");
    for (const auto& [path, delta] : peft_deltas) {
      if (!ours.count(path)) {
        failures.push_back("no combined adapter on " + path);
        continue;
      }
      expect("delta of " + path, ours.at(path), delta, delta_tolerance.at(path));
    }
    peft::set_adapter(*model, "w");
    torch::NoGradGuard no_grad;
    const auto ids = ms::SafetensorsFile::open((dir / "inputs.safetensors").string())->get("input_ids");
    // A truncated SVD carries LAPACK's rounding (OpenBLAS here, MKL under
    // PEFT) into the logits, which the model amplifies: the deltas above are
    // held to 1e-5, the logits of the *_svd types to 1e-4 (one CI case moved
    // 3.8e-5 relative with its deltas within 1e-5).
    expect("logits with w", model->forward(ids),
           ms::SafetensorsFile::open((dir / "expected.safetensors").string())->get("logits"),
           svd || call.contains("svd_clamp") ? kFactorTolerance : kTolerance);
  }

  // d9d-peft combine on the directories.
  const fs::path out = scratch / dir.filename();
  fs::remove_all(out);
  std::string cmd = quote(cli) + " combine";
  for (size_t i = 0; i < adapters.size(); ++i) {
    cmd += fmt::format(" --adapter {} --weight {}", quote(dir / "adapters" / adapters[i]), weights[i]);
  }
  cmd += " --type " + type + " --out " + quote(out) + " --seed 0";
  if (call.contains("density")) cmd += fmt::format(" --density {}", call.at("density").get<double>());
  if (call.contains("majority_sign_method")) cmd += " --majority-sign " + call.at("majority_sign_method").get<std::string>();
  if (call.contains("svd_rank")) cmd += fmt::format(" --svd-rank {}", call.at("svd_rank").get<int64_t>());
  if (call.contains("svd_clamp")) cmd += fmt::format(" --svd-clamp {}", call.at("svd_clamp").get<double>());
  if (call.contains("svd_full_matrices") && !call.at("svd_full_matrices").get<bool>()) cmd += " --svd-reduced";
  const int status = std::system((cmd + " > " + quote(scratch / "cli.log") + " 2>&1").c_str());
  if (status != 0) {
    std::ifstream log(scratch / "cli.log");
    std::stringstream text;
    text << log.rdbuf();
    failures.push_back("d9d-peft combine failed: " + cmd + "\n" + text.str());
    return failures;
  }
  const json theirs = read_json(dir / "adapters" / "w" / "adapter_config.json");
  const json ours = read_json(out / "adapter_config.json");
  for (const char* field : {"r", "lora_alpha", "use_rslora", "lora_dropout", "rank_pattern", "alpha_pattern"}) {
    if (ours.at(field) != theirs.at(field)) {
      failures.push_back(fmt::format("d9d-peft combine: {} is {}, PEFT's {}", field, ours.at(field).dump(),
                                     theirs.at(field).dump()));
    }
  }
  // PEFT writes a set's union in no set order.
  json t = theirs.at("target_modules"), o = ours.at("target_modules");
  if (t.is_array()) std::sort(t.begin(), t.end());
  if (t != o) failures.push_back(fmt::format("d9d-peft combine: target_modules {}, PEFT's {}", o.dump(), t.dump()));
  const auto cli_deltas = file_deltas(out);
  if (cli_deltas.size() != peft_deltas.size()) failures.push_back("d9d-peft combine: a different set of modules");
  for (const auto& [path, delta] : peft_deltas) {
    if (!cli_deltas.count(path)) {
      failures.push_back("d9d-peft combine: no " + path);
    } else if (!draws) {
      expect("d9d-peft combine: delta of " + path, cli_deltas.at(path), delta, delta_tolerance.at(path));
    } else if (cli_deltas.at(path).sizes() != delta.sizes()) {
      failures.push_back("d9d-peft combine: shape of " + path);
    }
  }
  fs::remove_all(out);
  return failures;
}

int check(const fs::path& cases, const std::string& cli) {
  std::string rng_report;
  const bool exact_draws = same_draws(cases, rng_report);
  std::printf("peft-reference: Bernoulli draws from a seeded CPU generator, LibTorch %d.%d vs PyTorch: %s\n",
              TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR, rng_report.c_str());
  std::vector<fs::path> dirs;
  for (const auto& e : fs::directory_iterator(cases)) {
    if (e.is_directory() && e.path().filename().string().rfind("case_", 0) == 0) dirs.push_back(e.path());
  }
  std::sort(dirs.begin(), dirs.end());
  if (dirs.empty()) {
    std::fprintf(stderr, "peft-reference: no case_* under %s (run generate_weighted.py first)\n", cases.c_str());
    return 1;
  }
  const fs::path scratch = cases / "cli_scratch";
  fs::create_directories(scratch);
  int failed = 0, dare_compared = 0, dare_total = 0;
  std::map<std::string, int> per_type;
  for (const auto& dir : dirs) {
    std::vector<std::string> failures;
    const json info = read_json(dir / "config.json");
    const std::string type = info.at("call").at("combination_type");
    ++per_type[type];
    if (type.rfind("dare", 0) == 0) {
      ++dare_total;
      dare_compared += exact_draws || info.at("call").at("density").get<double>() >= 1.0;
    }
    try {
      failures = check_case(dir, cli, exact_draws, scratch);
    } catch (const std::exception& e) {
      failures.push_back(std::string("error: ") + e.what());
    }
    if (failures.empty()) continue;
    ++failed;
    std::printf("FAIL %s\n  adapters: %s\n  call: %s\n", dir.filename().c_str(), info.at("adapters").dump().c_str(),
                info.at("call").dump().c_str());
    for (const auto& f : failures) std::printf("  %s\n", f.c_str());
    std::printf("  reproduce: python3 tests/peft_reference/generate_weighted.py --out DIR --seed %s --count 1 --types %s\n",
                dir.filename().string().substr(5).c_str(), info.at("call").at("combination_type").get<std::string>().c_str());
  }
  fs::remove_all(scratch);
  std::string types;
  for (const auto& [t, n] : per_type) types += fmt::format("{}{} {}", types.empty() ? "" : ", ", t, n);
  std::printf("peft-reference: %zu add_weighted_adapter cases (%s): %zu matched PEFT to %g relative (svd_clamp factors %g), %d failed; "
              "DARE cases compared with PEFT's masks: %d of %d\n",
              dirs.size(), types.c_str(), dirs.size() - failed, kTolerance, kFactorTolerance, failed, dare_compared, dare_total);
  if (gap_widened_count) {
    std::printf("peft-reference: %d layers of *_svd cases were truncated where the spectral gap lets another LAPACK "
                "move the delta by more than %g; they were held to %g plus that bound (the largest %.3g relative)\n",
                gap_widened_count, kTolerance, kTolerance, max_gap_slack);
  }
  if (clamp_aligned_count) {
    std::printf("peft-reference: %d svd_clamp cases: this LAPACK chose other SVD signs than PEFT's, so the clamp "
                "(whose quantile depends on them) was checked on factors sign-aligned with PEFT's; %d components "
                "with close or zero singular values, fixed only as a subspace, matched PEFT's product and took its basis\n",
                clamp_aligned_count, clamp_adopted_count);
  }
  if (!exact_draws && dare_compared < dare_total) {
    std::printf("peft-reference: this LibTorch draws other Bernoulli masks than PyTorch, so DARE cases with "
                "density < 1 were checked for the config and shapes only (tests/test_weighted.cpp checks the "
                "masks' defining properties)\n");
  }
  return failed ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5 || std::string(argv[1]) != "check" || std::string(argv[3]) != "--cli") {
    std::fprintf(stderr, "usage: peft_weighted_tool check CASES --cli D9D_PEFT\n");
    return 2;
  }
  try {
    return check(argv[2], argv[4]);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "peft-reference: %s\n", e.what());
    return 1;
  }
}
