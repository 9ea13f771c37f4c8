// Two-thread stress test of SpscRing, meant to be built with -fsanitize=thread: a producer writes an
// increasing int32 sequence in random block sizes, a consumer checks it. Block policy: nothing lost or
// reordered. DropOldest: strictly increasing (losses allowed, never duplicates or torn data), and
// read + dropped == written. Exit code 0 on success.
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

#include "spsc_ring.hpp"

namespace {

int run(kimia::OverflowPolicy policy, const char* name, int64_t total) {
  kimia::SpscRing<int32_t> ring(4096, policy);
  std::thread producer([&] {
    std::mt19937 rng(1);
    std::uniform_int_distribution<int> size(1, 700);
    std::vector<int32_t> block(700);
    int64_t next = 0;
    while (next < total) {
      const int64_t n = std::min<int64_t>(size(rng), total - next);
      for (int64_t i = 0; i < n; ++i) block[i] = static_cast<int32_t>(next + i);
      const size_t done = ring.write(block.data(), static_cast<size_t>(n), -1.0);
      if (static_cast<int64_t>(done) != n) {
        std::fprintf(stderr, "%s: write returned %zu of %lld\n", name, done, static_cast<long long>(n));
        std::abort();
      }
      next += n;
    }
    ring.close();
  });

  std::vector<int32_t> out(500);
  int64_t last = -1, received = 0;
  std::mt19937 rng(2);
  std::uniform_int_distribution<int> size(1, 500);
  while (true) {
    const size_t want = static_cast<size_t>(size(rng));
    const size_t got = (want % 3 == 0) ? ring.read_nowait(out.data(), want, false) : ring.read(out.data(), want, 1.0);
    if (got == 0 && ring.closed() && ring.available() == 0) break;
    for (size_t i = 0; i < got; ++i) {
      const bool ok = policy == kimia::OverflowPolicy::Block ? out[i] == last + 1 : out[i] > last;
      if (!ok) {
        std::fprintf(stderr, "%s: got %d after %lld\n", name, out[i], static_cast<long long>(last));
        return 1;
      }
      last = out[i];
    }
    received += static_cast<int64_t>(got);
  }
  producer.join();
  const kimia::RingStats s = ring.stats();
  const bool counts_ok = static_cast<int64_t>(s.total_written) == total && static_cast<int64_t>(s.total_read) == received &&
                         static_cast<int64_t>(s.total_read + s.dropped) == total && last == total - 1;
  std::printf("%s: moved %lld, dropped %llu, overruns %llu, underruns %llu, high water %llu: %s\n", name,
              static_cast<long long>(received), static_cast<unsigned long long>(s.dropped),
              static_cast<unsigned long long>(s.overruns), static_cast<unsigned long long>(s.underruns),
              static_cast<unsigned long long>(s.high_water), counts_ok ? "ok" : "COUNTS WRONG");
  return counts_ok ? 0 : 1;
}

}  // namespace

int main() {
  const int64_t total = 2'000'000;  // enough interleavings under TSan's ~10x slowdown
  int rc = run(kimia::OverflowPolicy::Block, "block", total);
  rc |= run(kimia::OverflowPolicy::DropOldest, "drop_oldest", total);
  return rc;
}
