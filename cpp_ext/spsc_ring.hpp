// Single-producer single-consumer ring buffer for audio samples and tokens.
//
// Lock-free on the data path: the producer owns `head_`, the consumer owns `tail_`; both are 64-bit
// monotonic sample counters (slot = counter % capacity), published with release and read with acquire.
// A mutex and two condition variables exist only for callers that choose to wait; a waiter announces
// itself in `waiters_` so that the fast path of the other side only touches the mutex when someone sleeps.
//
// Overflow policy, fixed at construction:
//   Block      - a writer waits (with timeout) for free space; nothing is ever overwritten.
//   DropOldest - a writer never waits: it overwrites the oldest unread samples. The consumer detects that it
//                was lapped (seqlock style: the producer announces `claim_` before it touches slots) and
//                drops whatever may have been overwritten while it copied, so it never returns torn data.
//   Raise      - a write that does not fit entirely is refused (all or nothing).
//
// Slots are plain 32-bit words. Under Block and Raise a slot is never written while it may be read (head and
// tail hand slots over with release/acquire), so copies are memcpy. Under DropOldest the producer may
// overwrite a slot the consumer is copying, so there each slot is stored with release and loaded with acquire
// through the GCC/Clang __atomic builtins: no data race in the memory model, ThreadSanitizer sees every
// ordering (it does not model standalone fences), and values round-trip bit-exactly, NaN payloads included.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace kimia {

enum class OverflowPolicy { Block, DropOldest, Raise };

struct RingStats {
  uint64_t total_written = 0;  // samples accepted by write calls (including ones later dropped)
  uint64_t total_read = 0;     // samples handed to readers
  uint64_t dropped = 0;        // samples overwritten before they were read (DropOldest)
  uint64_t overruns = 0;       // write calls that met a full ring (timed out, refused, or dropped)
  uint64_t underruns = 0;      // read calls that returned fewer samples than asked while the ring was open
  uint64_t high_water = 0;     // largest fill level seen, in samples
};

class RingClosed : public std::runtime_error {
 public:
  RingClosed() : std::runtime_error("ring is closed: no more writes are accepted") {}
};

class RingFull : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

using Clock = std::chrono::steady_clock;

// Constructed around every wait and destroyed when it ends; the Python bindings pass a guard that releases
// the GIL, so a call holds the GIL while it copies and lets it go only while it sleeps.
struct NoWaitGuard {};

template <typename T>
class SpscRing {
  static_assert(sizeof(T) == 4 && std::is_trivially_copyable<T>::value, "4-byte trivially copyable elements");
  using Bits = uint32_t;
  static_assert(__atomic_always_lock_free(sizeof(Bits), 0), "slots must allow lock-free atomic access");
  static_assert(std::atomic<uint64_t>::is_always_lock_free, "counters must be lock-free atomics");

 public:
  SpscRing(size_t capacity, OverflowPolicy policy)
      : capacity_(capacity), policy_(policy), slots_(capacity ? new Bits[capacity]() : nullptr) {
    if (capacity == 0) throw std::invalid_argument("capacity must be at least 1 sample");
  }

  // One producer and one consumer: a second thread entering a side while another is inside it (two producers
  // both waiting for space, say) would write over the same slots. The bindings hold a scope for every call, so
  // such a call raises instead of silently losing data.
  class SideScope {
   public:
    SideScope(std::atomic<int>& inside, const char* side) : inside_(inside) {
      if (inside_.fetch_add(1, std::memory_order_acq_rel) != 0) {
        inside_.fetch_sub(1, std::memory_order_acq_rel);
        throw std::logic_error(std::string("two threads used the ") + side +
                               " side of a single-producer single-consumer ring at the same time");
      }
    }
    ~SideScope() { inside_.fetch_sub(1, std::memory_order_acq_rel); }
    SideScope(const SideScope&) = delete;
    SideScope& operator=(const SideScope&) = delete;

   private:
    std::atomic<int>& inside_;
  };
  SideScope producer_scope() { return SideScope(producers_inside_, "producer"); }
  SideScope consumer_scope() { return SideScope(consumers_inside_, "consumer"); }

  size_t capacity() const { return capacity_; }
  OverflowPolicy policy() const { return policy_; }
  bool closed() const { return closed_.load(std::memory_order_acquire); }

  // Samples a reader can take now (never more than capacity).
  // seq_cst loads: the wait predicates use this (see wait_until); on x86 and AArch64 they cost what acquire does.
  size_t available() const {
    const uint64_t h = head_.load(std::memory_order_seq_cst);
    const uint64_t t = tail_.load(std::memory_order_seq_cst);
    return static_cast<size_t>(std::min<uint64_t>(h - t, capacity_));
  }
  size_t free_space() const { return capacity_ - available(); }

  // ---- producer side -------------------------------------------------------------------------------

  // Non-blocking write. Block: writes what fits now. DropOldest: writes everything (keeps the newest
  // `capacity` samples if n is larger). Raise: everything or RingFull. Returns samples accepted.
  size_t write_nowait(const T* src, size_t n) {
    if (closed()) throw RingClosed();
    return write_some(src, n, /*all_or_nothing=*/policy_ == OverflowPolicy::Raise);
  }

  // Blocking write (Block policy waits for space; the others behave as write_nowait).
  // timeout_s < 0 waits forever. Returns samples accepted: fewer than n only if the timeout expired.
  template <typename WaitGuard = NoWaitGuard>
  size_t write(const T* src, size_t n, double timeout_s) {
    if (policy_ != OverflowPolicy::Block) return write_nowait(src, n);
    const auto deadline = deadline_from(timeout_s);
    size_t done = 0;
    bool counted_overrun = false;
    while (true) {
      if (closed()) throw RingClosed();
      done += write_part(src + done, n - done);
      if (done == n) return done;
      if (!counted_overrun) {
        stat_overruns_.fetch_add(1, std::memory_order_relaxed);
        counted_overrun = true;
      }
      if (!wait_until<WaitGuard>(space_cv_, deadline, [&] { return free_space() > 0 || closed(); })) return done;
    }
  }

  // ---- consumer side -------------------------------------------------------------------------------

  // Non-blocking read of up to n samples into dst. If pad_silence, the rest of dst[0:n] is zero-filled.
  // Returns samples actually read. A short read on an open ring counts one underrun.
  size_t read_nowait(T* dst, size_t n, bool pad_silence) {
    const size_t got = read_some(dst, n);
    if (got < n) {
      if (!closed()) stat_underruns_.fetch_add(1, std::memory_order_relaxed);
      if (pad_silence) std::memset(static_cast<void*>(dst + got), 0, (n - got) * sizeof(T));
    }
    return got;
  }

  // Blocking read: waits until n samples were read, the ring is closed and drained (end of stream),
  // or the timeout expired (timeout_s < 0 waits forever). Returns samples read.
  template <typename WaitGuard = NoWaitGuard>
  size_t read(T* dst, size_t n, double timeout_s) {
    const auto deadline = deadline_from(timeout_s);
    size_t done = 0;
    while (true) {
      done += read_some(dst + done, n - done);
      if (done == n) return done;
      if (closed() && available() == 0) return done;  // end of stream: not an underrun
      if (!wait_until<WaitGuard>(data_cv_, deadline, [&] { return available() > 0 || closed(); })) {
        stat_underruns_.fetch_add(1, std::memory_order_relaxed);
        return done;
      }
    }
  }

  // Waits until at least min(n, capacity) samples can be read, or the ring is closed, or the timeout expires
  // (timeout_s < 0 waits forever). Reads nothing and counts nothing. Returns whether the samples are there.
  template <typename WaitGuard = NoWaitGuard>
  bool wait_readable(size_t n, double timeout_s) {
    n = std::min(n, capacity_);
    if (available() >= n) return true;
    wait_until<WaitGuard>(data_cv_, deadline_from(timeout_s), [&] { return available() >= n || closed(); });
    return available() >= n;
  }

  // Discards everything buffered. Call it from the consumer (or with no reader running).
  void clear() {
    const uint64_t h = head_.load(std::memory_order_acquire);
    tail_.store(h, std::memory_order_release);
    notify(space_cv_, space_waiters_);
  }

  // Ends the stream: later writes raise, every waiter wakes, readers drain what is left and then see
  // end of stream.
  void close() {
    closed_.store(true, std::memory_order_seq_cst);
    std::lock_guard<std::mutex> lock(mutex_);
    space_cv_.notify_all();
    data_cv_.notify_all();
  }

  RingStats stats() const {
    RingStats s;
    const uint64_t h = head_.load(std::memory_order_acquire);
    const uint64_t t = tail_.load(std::memory_order_acquire);
    s.total_written = h;
    s.total_read = stat_read_.load(std::memory_order_relaxed);
    // Samples lapped by the producer but not yet noticed by the consumer are dropped already.
    s.dropped = stat_dropped_.load(std::memory_order_relaxed) + (h - t > capacity_ ? h - t - capacity_ : 0);
    s.overruns = stat_overruns_.load(std::memory_order_relaxed);
    s.underruns = stat_underruns_.load(std::memory_order_relaxed);
    s.high_water = stat_high_water_.load(std::memory_order_relaxed);
    return s;
  }

 private:
  static Clock::time_point deadline_from(double timeout_s) {
    // Negative, NaN, infinite or beyond what the clock can add without overflowing (~292 years in ns): forever.
    // A plain conversion of a huge timeout overflows to a time in the past and would return at once.
    const auto now = Clock::now();
    const double room_s = std::chrono::duration<double>(Clock::time_point::max() - now).count();
    if (!(timeout_s >= 0) || !(timeout_s < room_s)) return Clock::time_point::max();
    return now + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s));
  }

  // Waits on cv until pred() or the deadline. The waiter count is raised (seq_cst RMW) before pred reads the
  // counters (seq_cst loads), and the other side stores its counter (seq_cst) before it reads the waiter
  // count (seq_cst): in the single total order one of them sees the other, so no wakeup is lost.
  template <typename WaitGuard, typename Pred>
  bool wait_until(std::condition_variable& cv, Clock::time_point deadline, Pred pred) {
    std::atomic<int>& waiters = (&cv == &space_cv_) ? space_waiters_ : data_waiters_;
    WaitGuard guard;  // before the lock: nobody holding mutex_ ever needs what the guard gives up
    (void)guard;
    std::unique_lock<std::mutex> lock(mutex_);
    waiters.fetch_add(1, std::memory_order_seq_cst);
    bool ok;
    if (deadline == Clock::time_point::max()) {
      cv.wait(lock, pred);
      ok = true;
    } else {
      ok = cv.wait_until(lock, deadline, pred);
    }
    waiters.fetch_sub(1, std::memory_order_seq_cst);
    return ok;
  }

  void notify(std::condition_variable& cv, std::atomic<int>& waiters) {
    if (waiters.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      cv.notify_all();
    }
  }

  size_t write_some(const T* src, size_t n, bool all_or_nothing) {
    if (policy_ == OverflowPolicy::DropOldest) return write_overwriting(src, n);
    const size_t space = free_space();
    if (n > space) {
      stat_overruns_.fetch_add(1, std::memory_order_relaxed);
      if (all_or_nothing) {
        throw RingFull("ring full: " + std::to_string(n) + " samples do not fit in the " + std::to_string(space) +
                       " free of " + std::to_string(capacity_));
      }
    }
    return write_part(src, n);
  }

  // Block/Raise: writes min(n, free) samples without overwriting unread data.
  size_t write_part(const T* src, size_t n) {
    const uint64_t h = head_.load(std::memory_order_relaxed);
    const uint64_t t = tail_.load(std::memory_order_acquire);
    const size_t k = std::min<size_t>(n, capacity_ - static_cast<size_t>(h - t));
    if (k == 0) return 0;
    store_slots(h, src, k);
    publish(h + k, t);
    return k;
  }

  // DropOldest: accepts all n samples; only the newest `capacity` of them can be stored.
  size_t write_overwriting(const T* src, size_t n) {
    if (n == 0) return 0;
    const uint64_t h = head_.load(std::memory_order_relaxed);
    const uint64_t t = tail_.load(std::memory_order_acquire);
    if (h + n - t > capacity_) stat_overruns_.fetch_add(1, std::memory_order_relaxed);
    const size_t k = std::min(n, capacity_);
    // Announce the slots about to be overwritten before touching them (seqlock writer side): a reader that
    // loads (acquire) any slot value stored (release) after this sees the claim too.
    claim_.store(h + n, std::memory_order_relaxed);
    store_slots(h + n - k, src + (n - k), k);
    publish(h + n, t);
    return n;
  }

  void store_slots(uint64_t start, const T* src, size_t k) {
    const size_t pos = static_cast<size_t>(start % capacity_);
    const size_t first = std::min(k, capacity_ - pos);  // up to the physical end, then wrap to slot 0
    if (policy_ != OverflowPolicy::DropOldest) {
      std::memcpy(slots_.get() + pos, src, first * sizeof(T));
      std::memcpy(slots_.get(), src + first, (k - first) * sizeof(T));
      return;
    }
    for (size_t i = 0; i < k; ++i) {
      Bits b;
      std::memcpy(&b, src + i, sizeof(Bits));
      __atomic_store_n(&slots_[i < first ? pos + i : i - first], b, __ATOMIC_RELEASE);
    }
  }

  void load_slots(uint64_t start, T* dst, size_t k) const {
    const size_t pos = static_cast<size_t>(start % capacity_);
    const size_t first = std::min(k, capacity_ - pos);
    if (policy_ != OverflowPolicy::DropOldest) {
      std::memcpy(static_cast<void*>(dst), slots_.get() + pos, first * sizeof(T));
      std::memcpy(static_cast<void*>(dst + first), slots_.get(), (k - first) * sizeof(T));
      return;
    }
    for (size_t i = 0; i < k; ++i) {
      const Bits b = __atomic_load_n(&slots_[i < first ? pos + i : i - first], __ATOMIC_ACQUIRE);
      std::memcpy(dst + i, &b, sizeof(Bits));
    }
  }

  void publish(uint64_t new_head, uint64_t tail_seen) {
    head_.store(new_head, std::memory_order_seq_cst);
    const uint64_t fill = std::min<uint64_t>(new_head - tail_seen, capacity_);
    if (fill > stat_high_water_.load(std::memory_order_relaxed)) stat_high_water_.store(fill, std::memory_order_relaxed);
    notify(data_cv_, data_waiters_);
  }

  // Reads up to n samples; never returns data the producer may have overwritten during the copy.
  size_t read_some(T* dst, size_t n) {
    uint64_t t = tail_.load(std::memory_order_relaxed);
    while (true) {
      const uint64_t h = head_.load(std::memory_order_acquire);
      uint64_t lost = 0;
      if (h - t > capacity_) {  // lapped: the oldest samples are gone
        lost = h - t - capacity_;
        t += lost;
      }
      const size_t k = static_cast<size_t>(std::min<uint64_t>(n, h - t));
      if (k > 0) load_slots(t, dst, k);
      size_t valid_from = 0;
      if (policy_ == OverflowPolicy::DropOldest && k > 0) {
        const uint64_t c = claim_.load(std::memory_order_relaxed);  // ordered after the acquire slot loads
        if (c > t + capacity_) {  // slots [t, c - capacity) may have changed while we copied them
          const uint64_t bad = std::min<uint64_t>(c - capacity_ - t, k);
          valid_from = static_cast<size_t>(bad);
        }
      }
      if (valid_from == k && k > 0) {  // everything copied was overwritten: drop it and try again
        stat_dropped_.fetch_add(lost + k, std::memory_order_relaxed);
        t += k;
        tail_.store(t, std::memory_order_seq_cst);
        continue;
      }
      if (valid_from > 0) std::memmove(static_cast<void*>(dst), dst + valid_from, (k - valid_from) * sizeof(T));
      stat_dropped_.fetch_add(lost + valid_from, std::memory_order_relaxed);
      const size_t got = k - valid_from;
      tail_.store(t + k, std::memory_order_seq_cst);
      stat_read_.fetch_add(got, std::memory_order_relaxed);
      if (k > 0 || lost > 0) notify(space_cv_, space_waiters_);
      return got;
    }
  }

  const size_t capacity_;
  const OverflowPolicy policy_;
  std::unique_ptr<Bits[]> slots_;

  alignas(64) std::atomic<uint64_t> head_{0};  // written by the producer
  std::atomic<uint64_t> claim_{0};             // DropOldest: end of the range the producer may be writing
  alignas(64) std::atomic<uint64_t> tail_{0};  // written by the consumer
  alignas(64) std::atomic<bool> closed_{false};
  std::atomic<int> producers_inside_{0};
  std::atomic<int> consumers_inside_{0};

  std::atomic<uint64_t> stat_read_{0};
  std::atomic<uint64_t> stat_dropped_{0};
  std::atomic<uint64_t> stat_overruns_{0};
  std::atomic<uint64_t> stat_underruns_{0};
  std::atomic<uint64_t> stat_high_water_{0};

  std::mutex mutex_;
  std::condition_variable space_cv_, data_cv_;
  std::atomic<int> space_waiters_{0}, data_waiters_{0};
};

}  // namespace kimia
