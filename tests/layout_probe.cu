// Host-only probe of the persistent kernels' launch arithmetic (csrc/lstm_persistent.cuh), built
// by tests/test_launch_safety.py with nvcc and no GPU: the layouts the ops check and the barrier
// watchdog and poll back-off they pass to the kernels, printed for the Python side to compare.
//
// stdin, one query per line:
//   layout <kind> <nt> <wm> <wn> <wk> <nbg> <B> <D> <H> <elem_bytes> <I>
//       (kind: forward, backward, forward_cluster, forward_from_input; I only for the last)
//       -> "smem <bytes> grid <blocks> nu <blocks per group>" or "refused <message>"
//   watchdog -> "watchdog <ns>" (from FUSEDCONVLSTM_BARRIER_TIMEOUT_S) or "refused <message>"
//   poll -> "poll <ns>" (from FUSEDCONVLSTM_BARRIER_POLL_NS) or "refused <message>"
#include "lstm_persistent.cuh"

#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>

using fusedconvlstm::ScalarType;
using namespace fusedconvlstm::persistent;

static std::string layout_query(std::istringstream& in) {
  std::string kind;
  int64_t nt, wm, wn, wk, nbg, B, D, H, eb, I = 0;
  in >> kind >> nt >> wm >> wn >> wk >> nbg >> B >> D >> H >> eb >> I;
  const ScalarType dt = eb == 4 ? ScalarType::Float : ScalarType::BFloat16;
  const bool backward = kind == "backward", cluster = kind == "forward_cluster";
  // The arguments each op passes (lstm_persistent_forward.cu, lstm_persistent_backward.cu).
  Problem pb = check_problem_sizes(1, B, D, H, dt, "seq", nt, wm, wn, wk, nbg, false, /*k_is_4h=*/backward,
                                   backward ? 16 : 32, backward ? 1 : 4, "probe", cluster);
  if (kind == "forward_from_input") add_input_projection(pb.l, pb.cfg, I, static_cast<int>(eb));
  std::ostringstream out;
  out << "smem " << pb.l.smem << " grid " << pb.l.grid << " nu " << pb.l.nu;
  return out.str();
}

int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    std::string what;
    in >> what;
    try {
      if (what == "layout")
        std::cout << layout_query(in) << "\n";
      else if (what == "poll")
        std::cout << "poll " + std::to_string(poll_ns_from_env("probe")) << "\n";
      else
        std::cout << "watchdog " + std::to_string(watchdog_ns_from_env("probe")) << "\n";
    } catch (const std::exception& e) {
      std::string text = e.what();
      for (char& c : text)
        if (c == '\n') c = ' ';
      std::cout << "refused " << text << "\n";
    }
  }
  return 0;
}
