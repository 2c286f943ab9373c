#pragma once

#include <memory>
#include <string>

namespace re2 {
class RE2;
}

namespace d9d::peft {

/// A regular expression that must match a whole qualified name, as Python's
/// `re.fullmatch` does (PEFT's and d9d's semantics for `module_name_pattern`,
/// a string `target_modules`, `rank_pattern` keys...).
///
/// Patterns run on RE2: matching takes time linear in the name and bounded
/// memory and stack, whatever the pattern, so a hostile config or module
/// name cannot hang or crash the process. RE2 accepts Python's `re` syntax
/// except what needs backtracking: lookahead and lookbehind (`(?=`, `(?!`,
/// `(?<=`, `(?<!`), backreferences (`\1`, `(?P=name)`), atomic groups and
/// possessive quantifiers, conditionals, `\Z` (write `$`), and counted
/// repetition above 1000 (`a{1001}`). Those are refused when the pattern is
/// compiled, with the field named (docs/config-reference.md, "Patterns").
///
/// ```
/// d9d::peft::Pattern pattern(".*\\.(q|v)_proj", "module_name_pattern");
/// bool adapted = pattern.full_match("layers.0.attention.q_proj");  // true
/// ```
class Pattern {
 public:
  /// Compiles `regex`; a `ConfigError` at `path` when it is not valid RE2
  /// syntax (the message says why and what to write instead). An empty
  /// pattern matches only the empty name.
  Pattern(const std::string& regex, const std::string& path);

  /// Whether `text` matches the whole pattern.
  bool full_match(const std::string& text) const;
  /// The pattern as written.
  const std::string& source() const noexcept { return source_; }

  /// Why `regex` does not compile, or "" when it does: for readers that
  /// report errors their own way.
  static std::string syntax_error(const std::string& regex);

 private:
  std::string source_;
  std::shared_ptr<const re2::RE2> re_;
};

}  // namespace d9d::peft
