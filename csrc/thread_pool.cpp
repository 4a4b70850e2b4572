// Persistent thread pool; contract in thread_pool.h.
//
// Protocol: run() first closes the previous job by publishing a fresh generation whose next index is
// kClosed (no task can be claimed under it), then stores the task, the task count (release) and a zero
// completion count, then opens the job under another fresh generation with index 0 (release, under
// wake_mutex so that a worker going to sleep cannot miss it) and wakes sleepers. Every thread claims task
// indices with a compare-exchange on `job` that also checks the generation, and bounds them by the task
// count it read (acquire) after its generation. A worker that read a finished job's generation and then
// the new task count therefore sees at least the closed word, never the finished job's word, so it can
// never claim an index of the finished job beyond that job's count (without the close it could, run a
// phantom task and count it as completed). The job cannot change while any of its tasks is claimed but not
// completed, which keeps `task` valid for the claimer. run() returns once `completed` reaches the task
// count; workers that wake up later find nothing left to claim.
#include "thread_pool.h"

#include <pthread.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <string>
#include <system_error>

#include "errors.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace lenvm {

namespace {

constexpr std::chrono::microseconds kSpinMicroseconds{100};
constexpr int kPausesPerClockCheck = 64;
constexpr int kCallerSpinsBeforeYield = 4096;
constexpr int kMaxThreads = 1024;
constexpr int kMaxDefaultThreads = 8;
constexpr std::int64_t kMaxTasks = std::int64_t{1} << 31;
constexpr std::uint64_t kClosed = 0xFFFFFFFFu;  // next-index field of a closed job: above any task count

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

inline std::uint32_t generation_of(std::uint64_t job) { return static_cast<std::uint32_t>(job >> 32); }
inline std::int64_t index_of(std::uint64_t job) { return static_cast<std::int64_t>(job & 0xFFFFFFFFu); }

void check_thread_count(int num_threads) {
    check(num_threads >= 1 && num_threads <= kMaxThreads, "num_threads",
          "an integer in [1, " + std::to_string(kMaxThreads) + "]", num_threads);
}

}  // namespace

ThreadPool::ThreadPool(int num_threads) : shared_(std::make_unique<Shared>()), num_threads_(num_threads) {
    check_thread_count(num_threads);
}

ThreadPool::~ThreadPool() { shutdown(); }

int ThreadPool::num_threads() const { return num_threads_.load(std::memory_order_relaxed); }

void ThreadPool::set_num_threads(int num_threads) {
    check_thread_count(num_threads);
    std::lock_guard<std::mutex> lock(run_mutex_);
    if (num_threads == num_threads_) return;
    stop_workers();
    num_threads_.store(num_threads, std::memory_order_relaxed);
}

void ThreadPool::shutdown() {
    std::lock_guard<std::mutex> lock(run_mutex_);
    closed_ = true;
    stop_workers();
}

void ThreadPool::start_workers() {
    const std::uint32_t generation = generation_of(shared_->job.load(std::memory_order_relaxed));
    for (int i = 1; i < num_threads_; ++i) workers_.emplace_back(worker_loop, shared_.get(), generation);
}

void ThreadPool::stop_workers() {
    if (workers_.empty()) return;
    {
        std::lock_guard<std::mutex> wake_lock(shared_->wake_mutex);
        shared_->stop.store(true, std::memory_order_relaxed);
    }
    shared_->wake_cv.notify_all();
    for (std::thread& worker : workers_) worker.join();
    workers_.clear();
    shared_->stop.store(false, std::memory_order_relaxed);
}

void ThreadPool::before_fork() { run_mutex_.lock(); }

void ThreadPool::after_fork_in_parent() { run_mutex_.unlock(); }

void ThreadPool::after_fork_in_child() {
    // The workers do not exist in the child. Joining or detaching their handles would touch thread
    // descriptors that glibc recycles after fork, and a worker may have held wake_mutex at the fork: move
    // the handles into the old shared state and abandon it; run() starts fresh workers when needed.
    Shared* abandoned = shared_.release();
    abandoned->threads_left_behind = std::move(workers_);
    workers_.clear();
    shared_ = std::make_unique<Shared>();
    run_mutex_.unlock();
}

void ThreadPool::claim_and_run(Shared& shared, std::uint32_t generation) {
    const std::int64_t n_tasks = shared.n_tasks.load(std::memory_order_acquire);
    std::uint64_t job = shared.job.load(std::memory_order_acquire);
    while (generation_of(job) == generation && index_of(job) < n_tasks) {
        if (!shared.job.compare_exchange_weak(job, job + 1, std::memory_order_acq_rel,
                                              std::memory_order_acquire)) {
            continue;
        }
        const Task* task = shared.task.load(std::memory_order_relaxed);
        try {
            (*task)(index_of(job));
        } catch (...) {
            std::lock_guard<std::mutex> error_lock(shared.error_mutex);
            if (!shared.error) shared.error = std::current_exception();
        }
        shared.completed.fetch_add(1, std::memory_order_release);
        job = shared.job.load(std::memory_order_acquire);
    }
}

void ThreadPool::worker_loop(Shared* shared, std::uint32_t seen) {
    const auto has_news = [&] {
        return shared->stop.load(std::memory_order_relaxed) ||
               generation_of(shared->job.load(std::memory_order_acquire)) != seen;
    };
    const auto spin_for_news = [&] {
        const auto deadline = std::chrono::steady_clock::now() + kSpinMicroseconds;
        do {
            for (int i = 0; i < kPausesPerClockCheck; ++i) {
                if (has_news()) return true;
                cpu_relax();
            }
        } while (std::chrono::steady_clock::now() < deadline);
        return false;
    };
    for (;;) {
        if (!spin_for_news()) {
            std::unique_lock<std::mutex> wake_lock(shared->wake_mutex);
            shared->wake_cv.wait(wake_lock, has_news);
        }
        if (shared->stop.load(std::memory_order_relaxed)) return;
        seen = generation_of(shared->job.load(std::memory_order_acquire));
        claim_and_run(*shared, seen);
    }
}

void ThreadPool::run(std::int64_t n_tasks, const Task& task) {
    if (n_tasks <= 0) return;
    check(n_tasks < kMaxTasks, "n_tasks", "fewer than 2**31 tasks", n_tasks);
    std::lock_guard<std::mutex> lock(run_mutex_);
    if (!closed_ && workers_.empty() && num_threads_ > 1) start_workers();
    if (workers_.empty() || n_tasks == 1) {
        for (std::int64_t i = 0; i < n_tasks; ++i) task(i);
        return;
    }
    Shared& shared = *shared_;
    const std::uint32_t closed = generation_of(shared.job.load(std::memory_order_relaxed)) + 1;
    shared.job.store((std::uint64_t{closed} << 32) | kClosed, std::memory_order_release);
    shared.task.store(&task, std::memory_order_relaxed);
    shared.n_tasks.store(n_tasks, std::memory_order_release);
    shared.completed.store(0, std::memory_order_relaxed);
    const std::uint32_t generation = closed + 1;
    {
        std::lock_guard<std::mutex> wake_lock(shared.wake_mutex);
        shared.job.store(std::uint64_t{generation} << 32, std::memory_order_release);
    }
    shared.wake_cv.notify_all();
    claim_and_run(shared, generation);
    for (int spins = 0; shared.completed.load(std::memory_order_acquire) < n_tasks; ++spins) {
        if (spins < kCallerSpinsBeforeYield) {
            cpu_relax();
        } else {
            std::this_thread::yield();
        }
    }
    if (shared.error) {
        const std::exception_ptr error = shared.error;
        shared.error = nullptr;
        std::rethrow_exception(error);
    }
}

int default_num_threads() {
    if (const char* env = std::getenv("LENVM_RT_NUM_THREADS"); env != nullptr && *env != '\0') {
        char* end = nullptr;
        const long value = std::strtol(env, &end, 10);
        const bool ok = *end == '\0' && value >= 1 && value <= kMaxThreads;
        check(ok, "LENVM_RT_NUM_THREADS", "an integer in [1, " + std::to_string(kMaxThreads) + "]",
              "'" + std::string(env) + "'");
        return static_cast<int>(value);
    }
    const unsigned hardware = std::thread::hardware_concurrency();
    return std::clamp(static_cast<int>(hardware), 1, kMaxDefaultThreads);
}

namespace {

ThreadPool* the_default_pool = nullptr;

void default_pool_before_fork() {
    if (the_default_pool != nullptr) the_default_pool->before_fork();
}
void default_pool_after_fork_in_parent() {
    if (the_default_pool != nullptr) the_default_pool->after_fork_in_parent();
}
void default_pool_after_fork_in_child() {
    if (the_default_pool != nullptr) the_default_pool->after_fork_in_child();
}

// Joins the default pool's workers at normal process exit; the pool object itself stays valid.
struct DefaultPoolCloser {
    ~DefaultPoolCloser() { the_default_pool->shutdown(); }
};

}  // namespace

ThreadPool& default_pool() {
    static ThreadPool* const pool = [] {
        const int num_threads = default_num_threads();
        const int rc = pthread_atfork(default_pool_before_fork, default_pool_after_fork_in_parent,
                                      default_pool_after_fork_in_child);
        if (rc != 0) throw std::system_error(rc, std::generic_category(), "pthread_atfork");
        the_default_pool = new ThreadPool(num_threads);
        return the_default_pool;
    }();
    static const DefaultPoolCloser closer;
    return *pool;
}

std::int64_t pool_self_check(int num_threads, std::int64_t jobs, std::int64_t max_tasks) {
    check(jobs >= 0, "jobs", "a non-negative count", jobs);
    check(max_tasks >= 1 && max_tasks <= 4096, "max_tasks", "an integer in [1, 4096]", max_tasks);
    ThreadPool pool(num_threads);
    // Every slot past a job's task count must stay untouched: a claim beyond the job shows up there.
    std::vector<std::atomic<int>> runs(static_cast<std::size_t>(max_tasks) * 2);
    std::uint64_t state = 0x9E3779B97F4A7C15ull;
    std::int64_t faulty = 0;
    for (std::int64_t job = 0; job < jobs; ++job) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        const std::int64_t n_tasks = 1 + static_cast<std::int64_t>(state % static_cast<std::uint64_t>(max_tasks));
        for (auto& slot : runs) slot.store(0, std::memory_order_relaxed);
        pool.run(n_tasks, [&](std::int64_t task) {
            const std::size_t slot = std::min<std::size_t>(static_cast<std::size_t>(task), runs.size() - 1);
            runs[slot].fetch_add(1, std::memory_order_relaxed);
        });
        bool ok = true;
        for (std::size_t i = 0; i < runs.size(); ++i) {
            ok = ok && runs[i].load(std::memory_order_relaxed) == (static_cast<std::int64_t>(i) < n_tasks ? 1 : 0);
        }
        faulty += ok ? 0 : 1;
    }
    return faulty;
}

}  // namespace lenvm
