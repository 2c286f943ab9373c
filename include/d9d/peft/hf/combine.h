#pragma once

// Combining LoRA adapter directories into a new one without model code: the
// file form of `add_weighted_adapter` (`d9d-peft combine`).

#include <d9d/peft/lora/weighted.h>

#include <string>
#include <vector>

namespace d9d::peft::hf {

/// What `combine_adapter_dirs` wrote.
struct CombineResult {
  std::string combination_type;  ///< as applied (`linear` for one adapter)
  int64_t rank = 0;              ///< the new adapter's `r` (and `lora_alpha`)
  size_t modules = 0;            ///< adapted modules written
};

/// Reads the LoRA adapter directories `dirs` (`read_adapter_files`), combines
/// them with `weights` as `add_weighted_adapter` would in a model holding
/// them, and writes `out_dir/adapter_config.json` and
/// `out_dir/adapter_model.safetensors` together (temporary names, renamed
/// once both are complete; a failure leaves nothing new behind).
///
/// The config is the first adapter's as written, with PEFT's changes: `r` and
/// `lora_alpha` the new rank, `target_modules` the union of the lists (or the
/// regexes joined, `(re1)|(re2)`; a mix of lists and regexes is an error, as
/// in PEFT), `rank_pattern` and `alpha_pattern` emptied (a module whose
/// combined rank differs, from inputs with a `rank_pattern`, gets an entry
/// so that the file describes its weights). The adapted modules are those of
/// any input. `dare*` masks are drawn module by module in sorted path order
/// from `options.generator()` (PEFT's order is the model's, which the files
/// do not record). Errors are `PeftError`/`ConfigError` naming the directory,
/// key or field: another `peft_type`, DoRA, NaN or Inf, a module that is
/// linear in one adapter and an embedding in another, shapes that disagree
/// ("adapters of different base models?").
///
/// ```
/// d9d::peft::hf::combine_adapter_dirs({"adapters/a", "adapters/b"}, {0.7, 0.5}, "adapters/ab",
///                                     d9d::peft::WeightedAdapterOptions().combination_type("cat"));
/// ```
CombineResult combine_adapter_dirs(const std::vector<std::string>& dirs, const std::vector<double>& weights,
                                   const std::string& out_dir, const WeightedAdapterOptions& options = {});

}  // namespace d9d::peft::hf
