#!/bin/sh
# The trainer's resume checks, run by ctest (examples/trainer/CMakeLists.txt).
# DIR/a is the uninterrupted run (test trainer_resume_uninterrupted); the
# trainer's output goes to this script's output, where ctest looks for
# sanitizer reports.
#
#   test_resume.sh exact TRAINER CONFIG DIR
#       DIR/b: stop after step 25, resume (through the leftovers of a swap
#       killed halfway), and get byte for byte the adapter and merged model of
#       DIR/a, and its final loss.
#   test_resume.sh changed-config TRAINER CHANGED_CONFIG DIR
#       --resume of DIR/b with peft.params.dropout changed: refused, naming the
#       field, and nothing in DIR/b changes.
#   test_resume.sh no-checkpoint TRAINER CONFIG DIR
#       --resume into DIR/none, where there is no checkpoint: refused, naming
#       the path, and nothing is created.
set -u
mode=$1 trainer=$2 config=$3 dir=$4
mkdir -p "$dir" || exit 1

fail() {
  echo "FAILED: $*"
  exit 1
}

# run NAME ARGS...: runs the trainer, its output to DIR/NAME.log and here; sets rc.
run() {
  log="$dir/$1.log"
  shift
  "$trainer" "$@" > "$log" 2>&1
  rc=$?
  cat "$log"
}

case $mode in
exact)
  rm -rf "$dir/b"
  run b-stop --config "$config" --out "$dir/b" --stop-after-step 25
  [ "$rc" -eq 0 ] || fail "--stop-after-step 25 exited with $rc"
  grep -q "stopped after fine-tuning step 25 of 60" "$log" || fail "no 'stopped after' line"
  grep -q "continue with --resume: .* --resume\$" "$log" || fail "no 'continue with' line"
  grep -q '"step": 25,' "$dir/b/checkpoint/trainer_state.json" || fail "no checkpoint of step 25"

  # A run killed between the two renames that swap a checkpoint in: the old
  # one waits in checkpoint.old, the new one in checkpoint.new.
  mv "$dir/b/checkpoint" "$dir/b/checkpoint.old" && mkdir "$dir/b/checkpoint.new" &&
    : > "$dir/b/checkpoint.new/trainable.safetensors" || fail "cannot set up the leftovers"

  run b-resume --config "$config" --out "$dir/b" --resume
  [ "$rc" -eq 0 ] || fail "--resume exited with $rc"
  grep -q "checkpoint: restored" "$log" || fail "checkpoint.old was not restored"
  [ ! -e "$dir/b/checkpoint.old" ] && [ ! -e "$dir/b/checkpoint.new" ] || fail "leftovers remain"
  grep -q "resumed after step 25" "$log" || fail "did not resume after step 25"

  cmp "$dir/a/adapter/adapter_model.safetensors" "$dir/b/adapter/adapter_model.safetensors" ||
    fail "the resumed adapter differs from the uninterrupted run's"
  cmp "$dir/a/merged/model.safetensors" "$dir/b/merged/model.safetensors" ||
    fail "the resumed merged model differs from the uninterrupted run's"
  loss_a=$(grep '"finetune_final_loss"' "$dir/a/summary.json")
  loss_b=$(grep '"finetune_final_loss"' "$dir/b/summary.json")
  [ -n "$loss_a" ] && [ "$loss_a" = "$loss_b" ] || fail "final loss: $loss_a vs $loss_b"
  echo "resume exact: adapter and merged model identical, same final loss"
  ;;
changed-config)
  sums() { (cd "$dir/b" && find . -type f | LC_ALL=C sort | xargs cksum); }
  before=$(sums) || fail "no run in $dir/b"
  run b-changed --config "$config" --out "$dir/b" --resume
  [ "$rc" -eq 1 ] || fail "exited with $rc, not 1"
  grep -q "peft.params.dropout is 0.2 in this run's config but 0.1 in the one the checkpoint was saved with" "$log" ||
    fail "the error does not name peft.params.dropout"
  [ "$before" = "$(sums)" ] || fail "files in $dir/b changed"
  echo "resume refused: names peft.params.dropout, files unchanged"
  ;;
no-checkpoint)
  rm -rf "$dir/none"
  run none --config "$config" --out "$dir/none" --resume
  [ "$rc" -eq 1 ] || fail "exited with $rc, not 1"
  grep -qF "there is no training checkpoint in $dir/none/checkpoint" "$log" || fail "the error does not name the path"
  [ ! -e "$dir/none" ] || fail "$dir/none was created"
  echo "resume refused: names the missing checkpoint, creates nothing"
  ;;
*)
  fail "unknown mode $mode"
  ;;
esac
