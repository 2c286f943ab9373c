#include <d9d/distributed/data_parallel.h>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <chrono>
#include <mutex>

namespace d9d::distributed {

namespace detail {

using GradAccumulator = decltype(torch::autograd::impl::grad_accumulator(std::declval<const at::Tensor&>()));

struct Bucket {
  std::vector<size_t> params;    // indices into DataParallelState::params
  std::vector<int64_t> offsets;  // where each starts in `flat`
  int64_t numel = 0;
  at::Tensor flat;  // numel elements, filled every synchronised backward
  int64_t waiting = 0;  // gradients of this backward not ready yet
  bool launched = false;
  PendingCollective pending;
};

struct DataParallelState {
  explicit DataParallelState(ProcessGroup g) : group(std::move(g)) {}

  ProcessGroup group;
  std::vector<at::Tensor> params;
  std::vector<std::string> names;
  std::vector<size_t> bucket_of;
  std::vector<Bucket> buckets;
  std::vector<GradAccumulator> accumulators;
  std::vector<uintptr_t> hook_keys;
  int64_t trainable_bytes = 0;
  CommunicationStats stats;

  std::mutex mutex;
  bool no_sync = false;
  bool in_backward = false;  // a synchronising backward is under way
  int64_t launched_early = 0;  // buckets of this backward sent before its end
  bool in_backward_callback = false;
  std::vector<char> ready;
  size_t next_bucket = 0;

  void on_gradient_ready(size_t index);
  void begin_backward();
  void launch_ready_buckets();
  void launch(Bucket& bucket);
  void finish_backward();
};

void DataParallelState::begin_backward() {
  in_backward = true;
  std::fill(ready.begin(), ready.end(), 0);
  for (auto& bucket : buckets) {
    bucket.waiting = static_cast<int64_t>(bucket.params.size());
    bucket.launched = false;
    bucket.pending = PendingCollective();
  }
  next_bucket = 0;
  launched_early = 0;
  // Runs when this backward has computed everything, on the thread that ran it.
  torch::autograd::Engine::get_default_engine().queue_callback([this] { finish_backward(); });
}

void DataParallelState::on_gradient_ready(size_t index) {
  std::lock_guard<std::mutex> lock(mutex);
  if (no_sync) return;
  if (in_backward && ready[index]) {
    // A gradient reported twice: the backward that reported it first ended in
    // an exception before its end-of-backward callback ran. Let what it sent
    // finish (every rank sends the same buckets in the same order), then start over.
    for (auto& bucket : buckets) {
      if (bucket.launched) bucket.pending.wait();
    }
    in_backward = false;
  }
  if (!in_backward) begin_backward();
  ready[index] = 1;
  --buckets[bucket_of[index]].waiting;
  launch_ready_buckets();
}

// Buckets go out in index order on every rank, whatever order their
// gradients arrive in: collectives are matched by the order they are issued.
void DataParallelState::launch_ready_buckets() {
  while (next_bucket < buckets.size() && buckets[next_bucket].waiting == 0) launch(buckets[next_bucket++]);
}

void DataParallelState::launch(Bucket& bucket) {
  {
    at::NoGradGuard no_grad;
    for (size_t k = 0; k < bucket.params.size(); ++k) {
      const at::Tensor& param = params[bucket.params[k]];
      at::Tensor slot = bucket.flat.narrow(0, bucket.offsets[k], param.numel());
      const at::Tensor& grad = param.grad();
      if (grad.defined()) {
        slot.copy_(grad.reshape(-1));
      } else {
        slot.zero_();  // unused in this rank's backward: it contributes nothing
      }
    }
    bucket.flat.div_(static_cast<double>(group.size()));
  }
  bucket.pending = group.all_reduce_sum(bucket.flat);
  bucket.launched = true;
  launched_early += in_backward_callback ? 0 : 1;
}

void DataParallelState::finish_backward() {
  std::lock_guard<std::mutex> lock(mutex);
  struct Reset {
    bool& flag;
    ~Reset() { flag = false; }
  } reset{in_backward};
  // Buckets some of whose parameters got no gradient in this backward.
  for (auto& bucket : buckets) bucket.waiting = 0;
  in_backward_callback = true;
  launch_ready_buckets();
  in_backward_callback = false;
  const auto start = std::chrono::steady_clock::now();
  int64_t bytes = 0;
  for (auto& bucket : buckets) {
    bucket.pending.wait();
    bytes += bucket.flat.numel() * static_cast<int64_t>(bucket.flat.element_size());
  }
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  at::NoGradGuard no_grad;
  for (auto& bucket : buckets) {
    for (size_t k = 0; k < bucket.params.size(); ++k) {
      at::Tensor& param = params[bucket.params[k]];
      const at::Tensor mean = bucket.flat.narrow(0, bucket.offsets[k], param.numel()).view(param.sizes());
      if (param.grad().defined()) {
        param.mutable_grad().copy_(mean);
      } else {
        param.mutable_grad() = mean.clone();
      }
    }
  }
  stats.synchronized_steps += 1;
  stats.last_bytes_all_reduced = bytes;
  stats.last_collectives = static_cast<int64_t>(buckets.size());
  stats.last_collectives_during_backward = launched_early;
  stats.last_wait_seconds = waited;
  stats.total_bytes_all_reduced += bytes;
  stats.total_wait_seconds += waited;
}

namespace {

/// FNV-1a: the same on every rank and build, unlike std::hash.
uint64_t fnv1a(uint64_t h, const std::string& s) {
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

}  // namespace

}  // namespace detail

DistributedDataParallel::DistributedDataParallel(torch::nn::Module& module, ProcessGroup group,
                                                 DistributedDataParallelOptions options)
    : state_(std::make_unique<detail::DataParallelState>(std::move(group))) {
  auto& s = *state_;
  const std::string me = fmt::format("DistributedDataParallel (rank {} of {})", s.group.rank(), s.group.size());
  if (!(options.bucket_cap_mb() > 0)) {
    throw DistributedError(me + ": DistributedDataParallelOptions.bucket_cap_mb must be positive");
  }
  const auto device_type = s.group.device().type();
  for (const auto& item : module.named_parameters(/*recurse=*/true)) {
    const at::Tensor& p = item.value();
    if (!p.requires_grad()) continue;
    if (p.is_sparse() || p.device().type() != device_type) {
      throw DistributedError(fmt::format("{}: trainable parameter {} is a {} tensor on {}, but the {} group reduces "
                                         "dense {} tensors; move the model with ->to({}) first",
                                         me, item.key(), p.is_sparse() ? "sparse" : "dense", p.device().str(),
                                         s.group.backend(), s.group.device().str(), s.group.device().str()));
    }
    s.params.push_back(p);
    s.names.push_back(item.key());
  }
  if (s.params.empty()) {
    throw DistributedError(me + ": the module has no trainable parameter (none requires grad); inject a PEFT "
                                "method first (inject_peft_and_freeze), then attach");
  }

  // Every rank must hold the same trainable parameters: compare a fingerprint.
  uint64_t hash = 14695981039346656037ull;
  int64_t numel = 0;
  for (size_t i = 0; i < s.params.size(); ++i) {
    hash = detail::fnv1a(hash, fmt::format("{}:{}:{};", s.names[i], fmt::join(s.params[i].sizes(), ","),
                                           c10::toString(s.params[i].scalar_type())));
    numel += s.params[i].numel();
  }
  {
    const std::vector<int64_t> values{static_cast<int64_t>(s.params.size()), numel,
                                      static_cast<int64_t>(hash & 0x7fffffffffffffffull)};
    at::Tensor lo = at::tensor(values, at::kLong);
    at::Tensor hi = lo.clone();
    s.group.all_reduce_min(lo);
    s.group.all_reduce_max(hi);
    if (!lo.equal(hi)) {
      throw DistributedError(fmt::format(
          "{}: the ranks hold different trainable parameters (this rank: {} tensors, {} elements; over all ranks "
          "{}..{} tensors, {}..{} elements, or the same counts with other names, shapes or dtypes). Every rank must "
          "build the same model and inject the same PEFT config before attaching.",
          me, s.params.size(), numel, lo[0].item<int64_t>(), hi[0].item<int64_t>(), lo[1].item<int64_t>(),
          hi[1].item<int64_t>()));
    }
  }

  // Buckets, in reverse registration order: roughly the order backward
  // produces the gradients, so the first bucket fills (and goes out) first.
  const double cap = options.bucket_cap_mb() * 1024.0 * 1024.0;
  s.bucket_of.assign(s.params.size(), 0);
  for (size_t n = s.params.size(); n-- > 0;) {
    const at::Tensor& p = s.params[n];
    const double bytes = static_cast<double>(p.numel() * static_cast<int64_t>(p.element_size()));
    bool fresh = s.buckets.empty();
    if (!fresh) {
      const auto& last = s.buckets.back();
      const at::Tensor& first = s.params[last.params.front()];
      const double filled = static_cast<double>(last.numel * static_cast<int64_t>(p.element_size()));
      fresh = first.scalar_type() != p.scalar_type() || first.device() != p.device() || filled + bytes > cap;
    }
    if (fresh) s.buckets.emplace_back();
    auto& bucket = s.buckets.back();
    bucket.offsets.push_back(bucket.numel);
    bucket.params.push_back(n);
    bucket.numel += p.numel();
    s.bucket_of[n] = s.buckets.size() - 1;
    s.trainable_bytes += p.numel() * static_cast<int64_t>(p.element_size());
  }
  for (auto& bucket : s.buckets) {
    bucket.flat = at::empty({bucket.numel}, s.params[bucket.params.front()].options().requires_grad(false));
  }
  s.ready.assign(s.params.size(), 0);

  if (options.broadcast_parameters()) {
    at::NoGradGuard no_grad;
    for (auto& bucket : s.buckets) {
      // The bucket's buffer carries the values this once.
      for (size_t k = 0; k < bucket.params.size(); ++k) {
        const at::Tensor& p = s.params[bucket.params[k]];
        bucket.flat.narrow(0, bucket.offsets[k], p.numel()).copy_(p.detach().reshape(-1));
      }
      s.group.broadcast(bucket.flat, 0).wait();
      for (size_t k = 0; k < bucket.params.size(); ++k) {
        at::Tensor& p = s.params[bucket.params[k]];
        p.copy_(bucket.flat.narrow(0, bucket.offsets[k], p.numel()).view(p.sizes()));
      }
    }
  }

  // A hook after each parameter's gradient accumulator: its `.grad` is final
  // for this backward (local accumulation under no_sync included).
  for (size_t i = 0; i < s.params.size(); ++i) {
    auto accumulator = torch::autograd::impl::grad_accumulator(s.params[i]);
    auto* raw = &s;
    s.hook_keys.push_back(accumulator->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
        [raw, i](const torch::autograd::variable_list& outputs, const torch::autograd::variable_list&) {
          raw->on_gradient_ready(i);
          return outputs;
        })));
    s.accumulators.push_back(std::move(accumulator));
  }
}

DistributedDataParallel::~DistributedDataParallel() {
  if (!state_) return;
  for (size_t i = 0; i < state_->accumulators.size(); ++i) state_->accumulators[i]->del_post_hook(state_->hook_keys[i]);
}

DistributedDataParallel::NoSync::NoSync(DistributedDataParallel& ddp) : ddp_(ddp) {
  std::lock_guard<std::mutex> lock(ddp_.state_->mutex);
  previous_ = ddp_.state_->no_sync;
  ddp_.state_->no_sync = true;
}

DistributedDataParallel::NoSync::~NoSync() {
  std::lock_guard<std::mutex> lock(ddp_.state_->mutex);
  ddp_.state_->no_sync = previous_;
}

const ProcessGroup& DistributedDataParallel::group() const { return state_->group; }
const std::vector<at::Tensor>& DistributedDataParallel::parameters() const { return state_->params; }
const std::vector<std::string>& DistributedDataParallel::parameter_names() const { return state_->names; }
int64_t DistributedDataParallel::trainable_bytes() const { return state_->trainable_bytes; }
int64_t DistributedDataParallel::bucket_count() const { return static_cast<int64_t>(state_->buckets.size()); }
const CommunicationStats& DistributedDataParallel::stats() const { return state_->stats; }

}  // namespace d9d::distributed
