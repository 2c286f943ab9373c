// Full-match regular expressions on RE2 (linear time, bounded stack).
#include <d9d/peft/errors.h>
#include <d9d/peft/pattern.h>

#include <re2/re2.h>

#include <fmt/format.h>

namespace d9d::peft {

namespace {

RE2::Options pattern_options() {
  RE2::Options options;
  options.set_log_errors(false);  // errors are reported by the caller, never printed
  return options;
}

/// RE2's reason, with a hint for the Python syntax it does not take.
std::string explain(const std::string& regex, const std::string& reason) {
  std::string hint;
  if (regex.find("(?=") != std::string::npos || regex.find("(?!") != std::string::npos ||
      regex.find("(?<=") != std::string::npos || regex.find("(?<!") != std::string::npos) {
    hint = "lookahead and lookbehind are not supported; ";
  } else if (regex.find("\\Z") != std::string::npos) {
    hint = "\\Z is not supported (the whole name must match anyway: drop it or write $); ";
  }
  return fmt::format("{}{}patterns use RE2 syntax, which is Python's re without backtracking features "
                     "(lookaround, backreferences, atomic groups, possessive quantifiers, repeats over "
                     "1000): see docs/config-reference.md, \"Patterns\"",
                     reason.empty() ? "" : reason + "; ", hint);
}

}  // namespace

std::string Pattern::syntax_error(const std::string& regex) {
  RE2 re(regex, pattern_options());
  if (re.ok()) return "";
  return fmt::format("invalid regular expression \"{}\": {}", regex, explain(regex, re.error()));
}

Pattern::Pattern(const std::string& regex, const std::string& path) : source_(regex) {
  auto re = std::make_shared<const RE2>(regex, pattern_options());
  if (!re->ok()) {
    throw ConfigError(path, fmt::format("invalid regular expression \"{}\": {}", regex, explain(regex, re->error())));
  }
  re_ = std::move(re);
}

bool Pattern::full_match(const std::string& text) const { return RE2::FullMatch(text, *re_); }

}  // namespace d9d::peft
