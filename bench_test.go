package storage_test

// Benchmarks, each comparing this package with a reference side by side as
// sub-benchmarks of one Benchmark, so that their ratio holds on a noisy
// machine:
//
//   - BenchmarkBolt*: the bbolt engine (impl=snapmeta) against containerd's
//     own store, core/snapshots/storage (impl=containerd), both through
//     their drop-in package-level functions on a file of the same layout.
//     Write benchmarks use the default options, so every commit is fsynced:
//     the fsync is what they measure.
//   - BenchmarkEtcd*: the etcd engine (impl=snapmeta) against "raw etcd"
//     (impl=raw), the fewest clientv3 calls that do the same work on the same
//     embedded server and the same client (a read is one Get; a write is one
//     read and one guarded Txn). Every sub-benchmark reports roundtrips/op,
//     counted by a clientv3.KV wrapper. The embedded server runs in this
//     process, so B/op and allocs/op include the server's share, which is
//     the same for both.
//
// The reference always runs first, so that benchstat -col /impl shows
// snapmeta as the change. scripts/bench.sh runs them all and writes
// docs/benchmarks.md. Nothing here runs without -bench: fixtures are built by
// the benchmarks themselves, the expensive etcd ones once per process.

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"runtime/metrics"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	cstorage "github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/stretchr/testify/require"
	bolt "go.etcd.io/bbolt"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/etcdtest"
)

// ---------------------------------------------------------------------------
// Shared shapes of the fixtures.
// ---------------------------------------------------------------------------

// benchLabels are the labels of a typical committed layer: what containerd's
// snapshotter service and the CRI plugin put there.
func benchLabels(i int) map[string]string {
	return map[string]string{
		"containerd.io/snapshot.ref":              fmt.Sprintf("sha256:%064x", i),
		"containerd.io/snapshot/cri.layer-digest": fmt.Sprintf("sha256:%064x", i+1),
	}
}

// Walks run over benchWalkSize snapshots; one in benchSelectEvery carries
// the label that benchWalkFilter selects.
const (
	benchWalkSize    = 10_000
	benchWalk100k    = 100_000
	benchSelectEvery = 10
	benchSelectLabel = "bench/select"
	benchWalkFilter  = `labels."bench/select"==yes`
)

func walkLabels(i int) map[string]string {
	l := benchLabels(i)
	if i%benchSelectEvery == 0 {
		l[benchSelectLabel] = "yes"
	}
	return l
}

func walkName(i int) string { return fmt.Sprintf("walk-%06d", i) }

// benchDepths are the parent chain depths GetSnapshot is measured at.
var benchDepths = []int{1, 32, 128}

func chainLayer(depth, i int) string { return fmt.Sprintf("chain%d-layer%03d", depth, i) }
func chainTop(depth int) string      { return fmt.Sprintf("chain%d-active", depth) }

// benchChildren is how many children a parent gets in the write
// benchmarks: each round creates its own parents, so that the cost of an
// operation does not depend on how many rounds ran before.
const benchChildren = 32

// benchFillers is how many unrelated committed snapshots the bbolt fixture
// holds besides the ones measured, so lookups go through a real B+tree.
const benchFillers = 1000

// walkCount is a WalkFunc that counts.
func walkCount(n *int) snapshots.WalkFunc {
	return func(context.Context, snapshots.Info) error { *n++; return nil }
}

// runWriters runs b.N operations from writers goroutines that share the
// work, and reports ns/op (wall time per operation, so 1e9/ns/op is the
// throughput of all writers together) and tx/s. op gets a unique i.
func runWriters(b *testing.B, writers int, op func(worker, i int) error) {
	b.Helper()
	var (
		next     atomic.Int64
		wg       sync.WaitGroup
		errMu    sync.Mutex
		firstErr error
	)
	b.ResetTimer()
	start := time.Now()
	for w := range writers {
		wg.Go(func() {
			for {
				i := next.Add(1) - 1
				if i >= int64(b.N) {
					return
				}
				if err := op(w, int(i)); err != nil {
					errMu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					errMu.Unlock()
					next.Store(int64(b.N)) // stop the others
					return
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	require.NoError(b, firstErr)
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "tx/s")
}

// heapPeak samples the heap while a measured loop runs. It reports the peak
// of HeapInuse (live objects plus the GC's slack and fragmentation) and the
// peak live heap as of each GC, both above what was in use before the loop.
type heapPeak struct {
	stop, done          chan struct{}
	baseInuse, baseLive uint64
	peakInuse, peakLive uint64
}

var heapSampleNames = []string{
	"/memory/classes/heap/objects:bytes",
	"/memory/classes/heap/unused:bytes",
	"/gc/heap/live:bytes",
}

func readHeap(s []metrics.Sample) (inuse, live uint64) {
	metrics.Read(s)
	return s[0].Value.Uint64() + s[1].Value.Uint64(), s[2].Value.Uint64()
}

func startHeapPeak() *heapPeak {
	s := make([]metrics.Sample, len(heapSampleNames))
	for i, n := range heapSampleNames {
		s[i].Name = n
	}
	runtime.GC()
	h := &heapPeak{stop: make(chan struct{}), done: make(chan struct{})}
	h.baseInuse, h.baseLive = readHeap(s)
	h.peakInuse, h.peakLive = h.baseInuse, h.baseLive
	go func() {
		defer close(h.done)
		tick := time.NewTicker(200 * time.Microsecond)
		defer tick.Stop()
		for {
			inuse, live := readHeap(s)
			h.peakInuse, h.peakLive = max(h.peakInuse, inuse), max(h.peakLive, live)
			select {
			case <-h.stop:
				return
			case <-tick.C:
			}
		}
	}()
	return h
}

// report stops the sampler and reports peak-heap-MiB (HeapInuse) and
// peak-live-MiB (live heap), each above its value before the loop, and
// base-live-MiB, the live heap before the loop: the GC lets HeapInuse grow
// by about as much as that (GOGC=100) before it collects, so a peak-heap-MiB
// near it is the GC's slack, not the walk's.
func (h *heapPeak) report(b *testing.B) {
	close(h.stop)
	<-h.done
	const mib = 1 << 20
	b.ReportMetric(float64(h.peakInuse-h.baseInuse)/mib, "peak-heap-MiB")
	b.ReportMetric(float64(h.peakLive-h.baseLive)/mib, "peak-live-MiB")
	b.ReportMetric(float64(h.baseLive)/mib, "base-live-MiB")
}

// ---------------------------------------------------------------------------
// bbolt: containerd's store and ours behind one set of functions.
// ---------------------------------------------------------------------------

// boltImpl is one implementation of the drop-in API.
type boltImpl struct {
	name        string
	open        func(dbfile string) (withTx func(ctx context.Context, writable bool, fn func(context.Context) error) error, closeFn func() error, err error)
	getInfo     func(ctx context.Context, key string) (string, snapshots.Info, snapshots.Usage, error)
	getSnapshot func(ctx context.Context, key string) ([]string, error)
	create      func(ctx context.Context, kind snapshots.Kind, key, parent string, opts ...snapshots.Opt) error
	commit      func(ctx context.Context, key, name string, usage snapshots.Usage, opts ...snapshots.Opt) error
	remove      func(ctx context.Context, key string) error
	walk        func(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error
}

// boltImpls lists the reference first.
var boltImpls = []boltImpl{
	{
		name: "containerd",
		open: func(dbfile string) (func(context.Context, bool, func(context.Context) error) error, func() error, error) {
			ms, err := cstorage.NewMetaStore(dbfile)
			if err != nil {
				return nil, nil, err
			}
			return func(ctx context.Context, writable bool, fn func(context.Context) error) error {
				return ms.WithTransaction(ctx, writable, fn)
			}, ms.Close, nil
		},
		getInfo: cstorage.GetInfo,
		getSnapshot: func(ctx context.Context, key string) ([]string, error) {
			s, err := cstorage.GetSnapshot(ctx, key)
			return s.ParentIDs, err
		},
		create: func(ctx context.Context, kind snapshots.Kind, key, parent string, opts ...snapshots.Opt) error {
			_, err := cstorage.CreateSnapshot(ctx, kind, key, parent, opts...)
			return err
		},
		commit: func(ctx context.Context, key, name string, usage snapshots.Usage, opts ...snapshots.Opt) error {
			_, err := cstorage.CommitActive(ctx, key, name, usage, opts...)
			return err
		},
		remove: func(ctx context.Context, key string) error {
			_, _, err := cstorage.Remove(ctx, key)
			return err
		},
		walk: cstorage.WalkInfo,
	},
	{
		name: "snapmeta",
		open: func(dbfile string) (func(context.Context, bool, func(context.Context) error) error, func() error, error) {
			ms, err := storage.NewBoltMetaStore(dbfile)
			if err != nil {
				return nil, nil, err
			}
			return func(ctx context.Context, writable bool, fn func(context.Context) error) error {
				return ms.WithTransaction(ctx, writable, fn)
			}, ms.Close, nil
		},
		getInfo: storage.GetInfo,
		getSnapshot: func(ctx context.Context, key string) ([]string, error) {
			s, err := storage.GetSnapshot(ctx, key)
			return s.ParentIDs, err
		},
		create: func(ctx context.Context, kind snapshots.Kind, key, parent string, opts ...snapshots.Opt) error {
			_, err := storage.CreateSnapshot(ctx, kind, key, parent, opts...)
			return err
		},
		commit: func(ctx context.Context, key, name string, usage snapshots.Usage, opts ...snapshots.Opt) error {
			_, err := storage.CommitActive(ctx, key, name, usage, opts...)
			return err
		},
		remove: func(ctx context.Context, key string) error {
			_, _, err := storage.Remove(ctx, key)
			return err
		},
		walk: storage.WalkInfo,
	},
}

// boltBench is one implementation's store, open for a whole Benchmark
// function (all rounds of its sub-benchmarks).
type boltBench struct {
	boltImpl
	withTx func(ctx context.Context, writable bool, fn func(context.Context) error) error
	seq    atomic.Int64 // unique names across rounds
}

func (s *boltBench) update(b *testing.B, fn func(ctx context.Context) error) {
	b.Helper()
	require.NoError(b, s.withTx(context.Background(), true, fn))
}

func (s *boltBench) view(fn func(ctx context.Context) error) error {
	return s.withTx(context.Background(), false, fn)
}

// layer creates name as a committed snapshot on parent.
func (s *boltBench) layer(ctx context.Context, name, parent string, labels map[string]string) error {
	if err := s.create(ctx, snapshots.KindActive, name+"-extract", parent); err != nil {
		return err
	}
	return s.commit(ctx, name+"-extract", name, snapshots.Usage{Size: 4096, Inodes: 2}, snapshots.WithLabels(labels))
}

// openBoltBench opens impl's store in a directory of b (the parent
// benchmark: the store outlives the rounds of its sub-benchmarks) with
// "base", an "active" on it and benchFillers other layers.
func openBoltBench(b *testing.B, impl boltImpl) *boltBench {
	b.Helper()
	withTx, closeFn, err := impl.open(filepath.Join(b.TempDir(), "metadata.db"))
	require.NoError(b, err)
	b.Cleanup(func() { _ = closeFn() })
	s := &boltBench{boltImpl: impl, withTx: withTx}
	s.update(b, func(ctx context.Context) error {
		if err := s.layer(ctx, "base", "", benchLabels(0)); err != nil {
			return err
		}
		if err := s.create(ctx, snapshots.KindActive, "active", "base", snapshots.WithLabels(benchLabels(1))); err != nil {
			return err
		}
		for i := range benchFillers {
			if err := s.layer(ctx, fmt.Sprintf("filler-%04d", i), "", benchLabels(i)); err != nil {
				return err
			}
		}
		return nil
	})
	return s
}

// eachBoltImpl runs bench for every implementation, each on its own store.
func eachBoltImpl(b *testing.B, bench func(b *testing.B, s *boltBench)) {
	for _, impl := range boltImpls {
		s := openBoltBench(b, impl)
		b.Run("impl="+impl.name, func(b *testing.B) {
			b.ReportAllocs()
			bench(b, s)
		})
	}
}

func BenchmarkBoltStatActive(b *testing.B) {
	eachBoltImpl(b, func(b *testing.B, s *boltBench) {
		fn := func(ctx context.Context) error { _, _, _, err := s.getInfo(ctx, "active"); return err }
		for b.Loop() {
			if err := s.view(fn); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkBoltStatCommitted(b *testing.B) {
	eachBoltImpl(b, func(b *testing.B, s *boltBench) {
		fn := func(ctx context.Context) error { _, _, _, err := s.getInfo(ctx, "base"); return err }
		for b.Loop() {
			if err := s.view(fn); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// parents creates (untimed, in one transaction) committed layers enough for
// n operations on a parent each, benchChildren operations per parent, and
// returns the round's name prefix and the parent of operation i. Parents
// then have a bounded number of children whatever b.N is, as in real use.
func (s *boltBench) parents(b *testing.B, n int) (string, func(i int) string) {
	b.Helper()
	round := fmt.Sprintf("r%d", s.seq.Add(1))
	parent := func(i int) string { return fmt.Sprintf("%s-parent-%d", round, i/benchChildren) }
	s.update(b, func(ctx context.Context) error {
		for i := 0; i < n; i += benchChildren {
			if err := s.layer(ctx, parent(i), "", benchLabels(i)); err != nil {
				return err
			}
		}
		return nil
	})
	return round, parent
}

// BenchmarkBoltCreateActive is a driver's Prepare: one write transaction
// creating an active snapshot on a committed parent.
func BenchmarkBoltCreateActive(b *testing.B) {
	eachBoltImpl(b, func(b *testing.B, s *boltBench) {
		round, parent := s.parents(b, b.N)
		ctx := context.Background()
		b.ResetTimer()
		for i := range b.N {
			err := s.withTx(ctx, true, func(ctx context.Context) error {
				return s.create(ctx, snapshots.KindActive, fmt.Sprintf("%s-prepare-%d", round, i), parent(i))
			})
			if err != nil {
				b.Fatal(err)
			}
		}
	})
}

// createCommit is an image layer's extraction in one write transaction:
// create an active on parent, commit it with labels.
func (s *boltBench) createCommit(ctx context.Context, round string, i int, parent string) error {
	return s.withTx(ctx, true, func(ctx context.Context) error {
		key := fmt.Sprintf("%s-extract-%d", round, i)
		if err := s.create(ctx, snapshots.KindActive, key, parent); err != nil {
			return err
		}
		return s.commit(ctx, key, fmt.Sprintf("%s-layer-%d", round, i), snapshots.Usage{Size: 4096, Inodes: 2}, snapshots.WithLabels(benchLabels(i)))
	})
}

func BenchmarkBoltCreateCommit(b *testing.B) {
	eachBoltImpl(b, func(b *testing.B, s *boltBench) {
		round, parent := s.parents(b, b.N)
		ctx := context.Background()
		b.ResetTimer()
		for i := range b.N {
			if err := s.createCommit(ctx, round, i, parent(i)); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkBoltRemove removes actives, one write transaction each, created
// (untimed) beforehand.
func BenchmarkBoltRemove(b *testing.B) {
	eachBoltImpl(b, func(b *testing.B, s *boltBench) {
		round, parent := s.parents(b, b.N)
		name := func(i int) string { return fmt.Sprintf("%s-remove-%d", round, i) }
		for lo := 0; lo < b.N; lo += 1000 {
			s.update(b, func(ctx context.Context) error {
				for i := lo; i < min(lo+1000, b.N); i++ {
					if err := s.create(ctx, snapshots.KindActive, name(i), parent(i)); err != nil {
						return err
					}
				}
				return nil
			})
		}
		ctx := context.Background()
		b.ResetTimer()
		for i := range b.N {
			if err := s.withTx(ctx, true, func(ctx context.Context) error { return s.remove(ctx, name(i)) }); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkBoltGetSnapshot is a driver's Mounts: the parent chain of an
// active snapshot at the top of a chain of committed layers.
func BenchmarkBoltGetSnapshot(b *testing.B) {
	stores := make([]*boltBench, len(boltImpls))
	for j, impl := range boltImpls {
		s := openBoltBench(b, impl)
		s.update(b, func(ctx context.Context) error {
			for _, depth := range benchDepths {
				parent := ""
				for i := range depth {
					if err := s.layer(ctx, chainLayer(depth, i), parent, benchLabels(i)); err != nil {
						return err
					}
					parent = chainLayer(depth, i)
				}
				if err := s.create(ctx, snapshots.KindActive, chainTop(depth), parent); err != nil {
					return err
				}
			}
			return nil
		})
		stores[j] = s
	}
	for _, depth := range benchDepths {
		b.Run(fmt.Sprintf("depth=%d", depth), func(b *testing.B) {
			for _, s := range stores {
				b.Run("impl="+s.name, func(b *testing.B) {
					b.ReportAllocs()
					var parents []string
					fn := func(ctx context.Context) (err error) {
						parents, err = s.getSnapshot(ctx, chainTop(depth))
						return err
					}
					for b.Loop() {
						if err := s.view(fn); err != nil {
							b.Fatal(err)
						}
					}
					require.Len(b, parents, depth)
				})
			}
		})
	}
}

// createWalkViews creates n labelled views (walkName, walkLabels) in one
// write transaction: the store the walk and open benchmarks read.
func (s *boltBench) createWalkViews(b *testing.B, n int) {
	s.update(b, func(ctx context.Context) error {
		for i := range n {
			if err := s.create(ctx, snapshots.KindView, walkName(i), "", snapshots.WithLabels(walkLabels(i))); err != nil {
				return err
			}
		}
		return nil
	})
}

// BenchmarkBoltWalk walks benchWalkSize snapshots, all of them or with a
// label filter that selects one in benchSelectEvery.
func BenchmarkBoltWalk(b *testing.B) {
	stores := make([]*boltBench, len(boltImpls))
	for j, impl := range boltImpls {
		withTx, closeFn, err := impl.open(filepath.Join(b.TempDir(), "metadata.db"))
		require.NoError(b, err)
		b.Cleanup(func() { _ = closeFn() })
		s := &boltBench{boltImpl: impl, withTx: withTx}
		s.createWalkViews(b, benchWalkSize)
		stores[j] = s
	}
	for _, tc := range []struct {
		name    string
		filters []string
		want    int
	}{
		{"none", nil, benchWalkSize},
		{"label", []string{benchWalkFilter}, benchWalkSize / benchSelectEvery},
	} {
		b.Run("filter="+tc.name, func(b *testing.B) {
			for _, s := range stores {
				b.Run("impl="+s.name, func(b *testing.B) {
					b.ReportAllocs()
					var n int
					fn := func(ctx context.Context) error {
						n = 0
						return s.walk(ctx, walkCount(&n), tc.filters...)
					}
					for b.Loop() {
						if err := s.view(fn); err != nil {
							b.Fatal(err)
						}
					}
					require.Equal(b, tc.want, n)
				})
			}
		})
	}
}

// BenchmarkBoltOpen opens a file of n labelled snapshots and reads one
// record: what a daemon pays at start. Ours reads every page of the file's
// tree once at open, to refuse a file whose damage would kill the process
// (bolt_pages.go); containerd's maps the file and reads nothing.
// impl=read-file reads every byte of the same file forward, in pieces of a
// MiB, and nothing else: the floor of any open that reads every page.
func BenchmarkBoltOpen(b *testing.B) {
	for _, n := range []int{benchWalkSize, benchWalk100k} {
		b.Run(fmt.Sprintf("snapshots=%d", n), func(b *testing.B) {
			for _, impl := range boltImpls {
				dbfile := filepath.Join(b.TempDir(), "metadata.db")
				withTx, closeFn, err := impl.open(dbfile)
				require.NoError(b, err)
				s := &boltBench{boltImpl: impl, withTx: withTx}
				s.createWalkViews(b, n)
				require.NoError(b, closeFn())
				b.Run("impl="+impl.name, func(b *testing.B) {
					b.ReportAllocs()
					for b.Loop() {
						withTx, closeFn, err := impl.open(dbfile)
						require.NoError(b, err)
						require.NoError(b, withTx(context.Background(), false, func(ctx context.Context) error {
							_, _, _, err := impl.getInfo(ctx, walkName(n/2))
							return err
						}))
						require.NoError(b, closeFn())
					}
				})
				if impl.name != "snapmeta" {
					continue
				}
				b.Run("impl=read-file", func(b *testing.B) {
					b.ReportAllocs()
					buf := make([]byte, 1<<20)
					for b.Loop() {
						f, err := os.Open(dbfile)
						require.NoError(b, err)
						for off := int64(0); ; off += int64(len(buf)) {
							if _, err := f.ReadAt(buf, off); err != nil {
								require.ErrorIs(b, err, io.EOF)
								break
							}
						}
						require.NoError(b, f.Close())
					}
				})
			}
		})
	}
}

// BenchmarkBoltWriteTx runs create+commit write transactions (through
// WithTransaction, each fsynced) from several goroutines at once; ns/op is
// wall time per transaction, tx/s the throughput of all writers together.
//
// impl=bbolt-ideal is the ceiling of any group commit of N writers on
// bbolt: one goroutine, N extractions' records per bbolt transaction
// (rawCreateCommit: containerd's layout with the fewest calls, no active
// snapshot, nothing decoded), so nothing but bbolt's own work and one
// commit per N. No store writing containerd's layout through bbolt can
// commit N writers' transactions faster. impl=bbolt-ideal-two-steps is the
// same for the writes a store makes for each of these transactions, as
// containerd's does (rawPrepareThenCommit: the active written, then moved
// to its committed name): the ceiling for the work asked.
func BenchmarkBoltWriteTx(b *testing.B) {
	stores := make([]*boltBench, len(boltImpls))
	for j, impl := range boltImpls {
		stores[j] = openBoltBench(b, impl)
	}
	ideal := openRawBolt(b)
	for _, writers := range []int{1, 4, 16, 64} {
		b.Run(fmt.Sprintf("writers=%d", writers), func(b *testing.B) {
			for _, s := range stores {
				b.Run("impl="+s.name, func(b *testing.B) {
					b.ReportAllocs()
					round, parent := s.parents(b, b.N)
					ctx := context.Background()
					runWriters(b, writers, func(_ int, i int) error {
						return s.createCommit(ctx, round, i, parent(i))
					})
				})
			}
			for _, raw := range []struct {
				name  string
				write func(tx *bolt.Tx, round string, i int) error
			}{
				{"bbolt-ideal", rawCreateCommit},
				{"bbolt-ideal-two-steps", rawPrepareThenCommit},
			} {
				b.Run("impl="+raw.name, func(b *testing.B) {
					b.ReportAllocs()
					round := fmt.Sprintf("r%d", time.Now().UnixNano())
					for lo := 0; lo < b.N; lo += writers {
						err := ideal.Update(func(tx *bolt.Tx) error {
							for i := lo; i < min(lo+writers, b.N); i++ {
								if err := raw.write(tx, round, i); err != nil {
									return err
								}
							}
							return nil
						})
						if err != nil {
							b.Fatal(err)
						}
					}
					b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "tx/s")
				})
			}
		})
	}
}

// openRawBolt opens a bbolt file with containerd's two buckets, for the
// raw bbolt references (rawCreateCommit).
func openRawBolt(b *testing.B) *bolt.DB {
	db, err := bolt.Open(filepath.Join(b.TempDir(), "raw.db"), 0o600, nil)
	require.NoError(b, err)
	b.Cleanup(func() { _ = db.Close() })
	require.NoError(b, db.Update(func(tx *bolt.Tx) error {
		v1, err := tx.CreateBucket([]byte("v1"))
		if err != nil {
			return err
		}
		for _, name := range []string{"snapshots", "parents"} {
			if _, err := v1.CreateBucket([]byte(name)); err != nil {
				return err
			}
		}
		return nil
	}))
	return db
}

// rawCreateCommit writes, in tx, what an extraction (an active created on
// the snapshot with ID 1 and committed with two labels) leaves in
// containerd's layout, with the fewest bbolt calls.
func rawCreateCommit(tx *bolt.Tx, round string, i int) error {
	snaps, parents, id, err := rawBuckets(tx)
	if err != nil {
		return err
	}
	name := fmt.Appendf(nil, "%s-layer-%d", round, i)
	if err := rawRecord(snaps, name, id, snapshots.KindCommitted, i); err != nil {
		return err
	}
	return parents.Put(rawLink(id), name)
}

// rawPrepareThenCommit makes, in tx, the writes containerd's layout takes
// for the same extraction in two steps, with the fewest bbolt calls: an
// active created (its bucket and its children-index entry), then committed
// (a bucket under the committed name with its usage and two labels, the
// active's bucket deleted, the index entry given the committed name).
func rawPrepareThenCommit(tx *bolt.Tx, round string, i int) error {
	snaps, parents, id, err := rawBuckets(tx)
	if err != nil {
		return err
	}
	active := fmt.Appendf(nil, "%s-layer-%d-active", round, i)
	if err := rawRecord(snaps, active, id, snapshots.KindActive, i); err != nil {
		return err
	}
	if err := parents.Put(rawLink(id), active); err != nil {
		return err
	}
	committed := fmt.Appendf(nil, "%s-layer-%d", round, i)
	if err := rawRecord(snaps, committed, id, snapshots.KindCommitted, i); err != nil {
		return err
	}
	if err := snaps.DeleteBucket(active); err != nil {
		return err
	}
	return parents.Put(rawLink(id), committed)
}

// rawBuckets returns containerd's two buckets in tx and the next ID.
func rawBuckets(tx *bolt.Tx) (snaps, parents *bolt.Bucket, id uint64, err error) {
	v1 := tx.Bucket([]byte("v1"))
	snaps, parents = v1.Bucket([]byte("snapshots")), v1.Bucket([]byte("parents"))
	id, err = snaps.NextSequence()
	return snaps, parents, id, err
}

// rawLink is the children-index key of child id under the snapshot with ID 1.
func rawLink(id uint64) []byte { return binary.AppendUvarint([]byte{1, 0}, id) }

// rawRecord writes the bucket of a record of kind on "base" in
// containerd's layout: a committed one with its usage and benchLabels(i).
func rawRecord(snaps *bolt.Bucket, name []byte, id uint64, kind snapshots.Kind, i int) error {
	sb, err := snaps.CreateBucket(name)
	if err != nil {
		return err
	}
	now, _ := time.Now().MarshalBinary()
	kvs := [][2][]byte{
		{[]byte("id"), binary.AppendUvarint(nil, id)},
		{[]byte("kind"), {byte(kind)}},
		{[]byte("parent"), []byte("base")},
		{[]byte("createdat"), now},
		{[]byte("updatedat"), now},
	}
	if kind != snapshots.KindCommitted {
		return rawPuts(sb, kvs)
	}
	kvs = append(kvs, [2][]byte{[]byte("inodes"), binary.AppendVarint(nil, 2)}, [2][]byte{[]byte("size"), binary.AppendVarint(nil, 4096)})
	if err := rawPuts(sb, kvs); err != nil {
		return err
	}
	lb, err := sb.CreateBucket([]byte("labels"))
	if err != nil {
		return err
	}
	for k, v := range benchLabels(i) {
		if err := lb.Put([]byte(k), []byte(v)); err != nil {
			return err
		}
	}
	return nil
}

func rawPuts(b *bolt.Bucket, kvs [][2][]byte) error {
	for _, kv := range kvs {
		if err := b.Put(kv[0], kv[1]); err != nil {
			return err
		}
	}
	return nil
}

// boltParallelImpl is this package's store with parallel callbacks
// (WithParallelCallbacks), for the benchmarks of callbacks that do work.
func boltParallelImpl() boltImpl {
	impl := boltImpls[1]
	impl.name = "snapmeta-parallel"
	impl.open = func(dbfile string) (func(context.Context, bool, func(context.Context) error) error, func() error, error) {
		ms, err := storage.NewBoltMetaStore(dbfile, storage.WithParallelCallbacks())
		if err != nil {
			return nil, nil, err
		}
		return func(ctx context.Context, writable bool, fn func(context.Context) error) error {
			return ms.WithTransaction(ctx, writable, fn)
		}, ms.Close, nil
	}
	return impl
}

// BenchmarkBoltPrepareCommitWithWork is a driver's Prepare and Commit of
// a snapshot from 1, 4, 16 and 64 goroutines at once (writers=N; issue 16's
// target is at 16), where Prepare's callback does the
// driver's filesystem work: 2 ms of sleep (work=sleep2ms), or the write of
// a 4 KiB file and its fsync (work=fsync). Each operation is two write
// transactions (Prepare: create the active and work; Commit: commit it);
// tx/s counts operations. containerd's store and ours in the default mode
// run the callbacks one at a time; ours with WithParallelCallbacks runs
// them side by side.
func BenchmarkBoltPrepareCommitWithWork(b *testing.B) {
	impls := append(append([]boltImpl(nil), boltImpls...), boltParallelImpl())
	stores := make([]*boltBench, len(impls))
	for j, impl := range impls {
		stores[j] = openBoltBench(b, impl)
	}
	works := []struct {
		name string
		do   func(dir string, i int) error
	}{
		{"sleep2ms", func(string, int) error { time.Sleep(2 * time.Millisecond); return nil }},
		{"fsync", func(dir string, i int) error {
			f, err := os.Create(filepath.Join(dir, strconv.Itoa(i)))
			if err != nil {
				return err
			}
			_, err = f.Write(make([]byte, 4096))
			return errors.Join(err, f.Sync(), f.Close())
		}},
	}
	for _, work := range works {
		b.Run("work="+work.name, func(b *testing.B) {
			for _, writers := range []int{1, 4, 16, 64} {
				b.Run(fmt.Sprintf("writers=%d", writers), func(b *testing.B) {
					for _, s := range stores {
						b.Run("impl="+s.name, func(b *testing.B) {
							b.ReportAllocs()
							round, parent := s.parents(b, b.N)
							dir := b.TempDir()
							ctx := context.Background()
							runWriters(b, writers, func(_ int, i int) error {
								key := fmt.Sprintf("%s-prepare-%d", round, i)
								err := s.withTx(ctx, true, func(ctx context.Context) error {
									if err := s.create(ctx, snapshots.KindActive, key, parent(i)); err != nil {
										return err
									}
									return work.do(dir, i)
								})
								if err != nil {
									return err
								}
								return s.withTx(ctx, true, func(ctx context.Context) error {
									return s.commit(ctx, key, fmt.Sprintf("%s-layer-%d", round, i), snapshots.Usage{Size: 4096, Inodes: 2})
								})
							})
						})
					}
				})
			}
		})
	}
}

// ---------------------------------------------------------------------------
// etcd: our engine against raw clientv3 calls on the same server.
// ---------------------------------------------------------------------------

// etcdPrefix is where the etcd engine keeps root's keys (keys.go).
func etcdPrefix(root string) string { return root + "/" + storage.KeyEtcdVersion + "/" }

func etcdSnapshotKey(root, name string) string {
	return etcdPrefix(root) + storage.KeyEtcdSnapshots + "/" + name
}

// etcdFixture is what the etcd benchmarks share for the whole process: the
// roots built on the shared embedded server (which lives as long as the
// process) and copies of records, as values of the right size for the raw
// writes. It holds no client: clients belong to one Benchmark function and
// are closed at its end (TestMain checks that no goroutine outlives a run).
type etcdFixture struct {
	root      string // base, active, chains, busy; the single-client writes
	rawRoot   string // raw etcd's keys
	committed []byte // the record of base (committed, labelled)
	active    []byte // the record of active
}

// benchBusyChildren is how many children the parent "busy" has.
const benchBusyChildren = 10_000

var (
	etcdFixtureOnce sync.Once
	etcdFixtureVal  *etcdFixture
	etcdFixtureErr  error

	etcdBusyOnce sync.Once
	etcdBusyErr  error

	etcdWalkOnce sync.Once
	etcdWalkRoot string
	etcdWalkErr  error

	etcdWalk100kOnce sync.Once
	etcdWalk100kRoot string
	etcdWalk100kErr  error
)

// etcdBench is one Benchmark function's clients: ours counts into ourN,
// raw into rawN, both over the same connection.
type etcdBench struct {
	*etcdFixture
	cli        *clientv3.Client
	ms         storage.MetaStore
	raw        clientv3.KV
	ourN, rawN atomic.Int64
	// cached is a store of the same root with the watch cache
	// (impl=snapmeta-cache), counting into cacheN.
	cached storage.MetaStore
	cacheN atomic.Int64
}

// etcdRounds numbers rounds, so that every round of the process writes
// names of its own.
var etcdRounds atomic.Int64

func etcdRound() string { return fmt.Sprintf("r%d", etcdRounds.Add(1)) }

func newEtcdClient(b *testing.B) *clientv3.Client {
	b.Helper()
	cli, err := clientv3.New(benchEtcdServer(b).ClientConfig())
	require.NoError(b, err)
	b.Cleanup(func() { _ = cli.Close() })
	return cli
}

func countingWrapper(n *atomic.Int64) storage.EtcdOpt {
	return storage.WithKVWrapper(func(kv clientv3.KV) clientv3.KV { return countingKV{KV: kv, n: n} })
}

// The etcd the benchmarks run against: fsyncing, as every deployment does,
// with SNAPMETA_BENCH_ETCD_MEMBERS members (1 unless set; scripts/bench.sh
// runs 1 and 3), started once per process.
var (
	benchEtcdOnce sync.Once
	benchEtcd     *etcdtest.Cluster
	benchEtcdErr  error
)

func benchEtcdServer(b *testing.B) *etcdtest.Cluster {
	b.Helper()
	benchEtcdOnce.Do(func() {
		members := 1
		if v := os.Getenv("SNAPMETA_BENCH_ETCD_MEMBERS"); v != "" {
			if members, benchEtcdErr = strconv.Atoi(v); benchEtcdErr != nil {
				return
			}
		}
		benchEtcd, benchEtcdErr = etcdtest.NewCluster(members, etcdtest.WithFsync())
	})
	require.NoError(b, benchEtcdErr)
	return benchEtcd
}

// openEtcdBench returns clients on the process's etcd fixture, building it
// on first use.
func openEtcdBench(b *testing.B) *etcdBench {
	b.Helper()
	cli := newEtcdClient(b)
	etcdFixtureOnce.Do(func() { etcdFixtureVal, etcdFixtureErr = buildEtcdFixture(cli) })
	require.NoError(b, etcdFixtureErr)
	e := &etcdBench{etcdFixture: etcdFixtureVal, cli: cli}
	ms, err := storage.NewEtcdStoreFromClient(cli, e.root, countingWrapper(&e.ourN))
	require.NoError(b, err)
	b.Cleanup(func() { _ = ms.Close() })
	e.ms = ms
	e.raw = countingKV{KV: cli.KV, n: &e.rawN}
	cached, err := storage.NewEtcdStoreFromClient(cli, e.root, storage.WithWatchCache(), countingWrapper(&e.cacheN))
	require.NoError(b, err)
	require.NoError(b, storage.WaitWatchCache(context.Background(), cached))
	b.Cleanup(func() { _ = cached.Close() })
	e.cached = cached
	return e
}

// etcdLayer creates name as a committed snapshot on parent.
func etcdLayer(ctx context.Context, name, parent string, labels map[string]string) error {
	if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, name+"-extract", parent); err != nil {
		return err
	}
	_, err := storage.CommitActive(ctx, name+"-extract", name, snapshots.Usage{Size: 4096, Inodes: 2}, snapshots.WithLabels(labels))
	return err
}

// etcdBatch runs fn(i) for i in [0, n) through ms, per transactions of 40
// (etcd takes 128 operations per transaction).
func etcdBatch(ms storage.MetaStore, n int, fn func(ctx context.Context, i int) error) error {
	const perTx = 40
	for lo := 0; lo < n; lo += perTx {
		err := ms.WithTransaction(context.Background(), true, func(ctx context.Context) error {
			for i := lo; i < min(lo+perTx, n); i++ {
				if err := fn(ctx, i); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	return nil
}

func buildEtcdFixture(cli *clientv3.Client) (*etcdFixture, error) {
	ctx := context.Background()
	f := &etcdFixture{root: "bench/main", rawRoot: "bench/raw"}
	ms, err := storage.NewEtcdStoreFromClient(cli, f.root)
	if err != nil {
		return nil, err
	}
	defer ms.Close()
	err = ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		if err := etcdLayer(ctx, "base", "", benchLabels(0)); err != nil {
			return err
		}
		_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "active", "base", snapshots.WithLabels(benchLabels(1)))
		return err
	})
	if err != nil {
		return nil, err
	}
	for _, depth := range benchDepths {
		err := etcdBatch(ms, depth, func(ctx context.Context, i int) error {
			parent := ""
			if i > 0 {
				parent = chainLayer(depth, i-1)
			}
			return etcdLayer(ctx, chainLayer(depth, i), parent, benchLabels(i))
		})
		if err != nil {
			return nil, err
		}
		err = ms.WithTransaction(ctx, true, func(ctx context.Context) error {
			_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, chainTop(depth), chainLayer(depth, depth-1))
			return err
		})
		if err != nil {
			return nil, err
		}
	}
	// Raw etcd takes the records' bytes as the values it writes.
	resp, err := cli.Txn(ctx).Then(
		clientv3.OpGet(etcdSnapshotKey(f.root, "base")),
		clientv3.OpGet(etcdSnapshotKey(f.root, "active")),
	).Commit()
	if err != nil {
		return nil, err
	}
	f.committed = resp.Responses[0].GetResponseRange().Kvs[0].Value
	f.active = resp.Responses[1].GetResponseRange().Kvs[0].Value
	return f, nil
}

// buildEtcdWalk creates n views under root, from several stores at once.
func buildEtcdWalk(b *testing.B, root string, n int) error {
	return buildEtcdWalkOn(benchEtcdServer(b).ClientConfig(), root, n)
}

// buildEtcdWalkOn is buildEtcdWalk on the etcd cfg reaches.
func buildEtcdWalkOn(cfg clientv3.Config, root string, n int) error {
	const workers, perTx = 8, 40
	var (
		next atomic.Int64
		wg   sync.WaitGroup
		errs = make([]error, workers)
	)
	for w := range workers {
		wg.Go(func() {
			ms, err := storage.NewEtcdStore(root, &cfg)
			if err != nil {
				errs[w] = err
				return
			}
			defer ms.Close()
			for {
				lo := int(next.Add(perTx)) - perTx
				if lo >= n {
					return
				}
				err := ms.WithTransaction(context.Background(), true, func(ctx context.Context) error {
					for i := lo; i < min(lo+perTx, n); i++ {
						if _, err := storage.CreateSnapshot(ctx, snapshots.KindView, walkName(i), "", snapshots.WithLabels(walkLabels(i))); err != nil {
							return err
						}
					}
					return nil
				})
				if err != nil {
					errs[w] = err
					return
				}
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// ourParents creates (untimed) committed layers enough for n operations on
// a parent each, benchChildren operations per parent, and returns the parent
// of operation i (see boltBench.parents).
func (e *etcdBench) ourParents(b *testing.B, round string, n int) func(i int) string {
	b.Helper()
	parent := func(i int) string { return fmt.Sprintf("%s-parent-%d", round, i/benchChildren) }
	require.NoError(b, etcdBatch(e.ms, (n+benchChildren-1)/benchChildren, func(ctx context.Context, j int) error {
		return etcdLayer(ctx, parent(j*benchChildren), "", benchLabels(j))
	}))
	return parent
}

// rawParents is ourParents for raw etcd: records put as they are.
func (e *etcdBench) rawParents(b *testing.B, round string, n int) func(i int) string {
	b.Helper()
	parent := func(i int) string { return fmt.Sprintf("%s-parent-%d", round, i/benchChildren) }
	var ops []clientv3.Op
	flush := func() {
		_, err := e.cli.Txn(context.Background()).Then(ops...).Commit()
		require.NoError(b, err)
		ops = ops[:0]
	}
	for i := 0; i < n; i += benchChildren {
		ops = append(ops, clientv3.OpPut(rawKey(e.rawRoot, parent(i)), string(e.committed)))
		if len(ops) == 128 {
			flush()
		}
	}
	if len(ops) > 0 {
		flush()
	}
	return parent
}

// Raw etcd's layout: a record per name and a children index, as ours.
func rawKey(rawRoot, name string) string { return rawRoot + "/snapshots/" + name }
func rawChildPrefix(rawRoot, parent string) string {
	return rawRoot + "/children/" + parent + "/"
}

var errRaw = errors.New("raw etcd: unexpected state")

// rawCreate is the least a create needs: one read of key and parent, one
// guarded write of the record and the parent link.
func (e *etcdBench) rawCreate(ctx context.Context, key, parent string) error {
	k, pk := rawKey(e.rawRoot, key), rawKey(e.rawRoot, parent)
	r, err := e.raw.Txn(ctx).Then(clientv3.OpGet(k), clientv3.OpGet(pk)).Commit()
	if err != nil {
		return err
	}
	if len(r.Responses[0].GetResponseRange().Kvs) != 0 || len(r.Responses[1].GetResponseRange().Kvs) != 1 {
		return errRaw
	}
	p := r.Responses[1].GetResponseRange().Kvs[0]
	return guardedTxn(ctx, e.raw, []clientv3.Cmp{
		clientv3.Compare(clientv3.ModRevision(k), "=", 0),
		clientv3.Compare(clientv3.ModRevision(pk), "=", p.ModRevision),
	}, clientv3.OpPut(k, string(e.active)), clientv3.OpPut(rawChildPrefix(e.rawRoot, parent)+key, key))
}

// rawCreateCommit is the least a create+commit in one transaction needs: one
// read of the active's key, the committed name and the parent, one guarded
// write of the committed record and the parent link.
func (e *etcdBench) rawCreateCommit(ctx context.Context, kv clientv3.KV, round string, i int, parent string) error {
	key, name := fmt.Sprintf("%s-extract-%d", round, i), fmt.Sprintf("%s-layer-%d", round, i)
	k, nk, pk := rawKey(e.rawRoot, key), rawKey(e.rawRoot, name), rawKey(e.rawRoot, parent)
	r, err := kv.Txn(ctx).Then(clientv3.OpGet(k), clientv3.OpGet(nk), clientv3.OpGet(pk)).Commit()
	if err != nil {
		return err
	}
	if len(r.Responses[0].GetResponseRange().Kvs) != 0 || len(r.Responses[1].GetResponseRange().Kvs) != 0 ||
		len(r.Responses[2].GetResponseRange().Kvs) != 1 {
		return errRaw
	}
	p := r.Responses[2].GetResponseRange().Kvs[0]
	return guardedTxn(ctx, kv, []clientv3.Cmp{
		clientv3.Compare(clientv3.ModRevision(k), "=", 0),
		clientv3.Compare(clientv3.ModRevision(nk), "=", 0),
		clientv3.Compare(clientv3.ModRevision(pk), "=", p.ModRevision),
	}, clientv3.OpPut(nk, string(e.committed)), clientv3.OpPut(rawChildPrefix(e.rawRoot, parent)+name, name))
}

// guardedTxn sends one Txn of ops under cmps; failed compares are errRaw.
func guardedTxn(ctx context.Context, kv clientv3.KV, cmps []clientv3.Cmp, ops ...clientv3.Op) error {
	w, err := kv.Txn(ctx).If(cmps...).Then(ops...).Commit()
	if err != nil {
		return err
	}
	if !w.Succeeded {
		return errRaw
	}
	return nil
}

// rawTwoTxns is the physical limit of a driver's Prepare and later Commit
// of one layer: two guarded Txns and no reads, each checking by compares
// alone what it depends on (the parent exists and the key does not; the
// active exists and the name does not).
func (e *etcdBench) rawTwoTxns(ctx context.Context, kv clientv3.KV, round string, i int, parent string) error {
	key, name := fmt.Sprintf("%s-extract-%d", round, i), fmt.Sprintf("%s-layer-%d", round, i)
	k, nk, pk := rawKey(e.rawRoot, key), rawKey(e.rawRoot, name), rawKey(e.rawRoot, parent)
	link := rawChildPrefix(e.rawRoot, parent) + key
	if err := guardedTxn(ctx, kv, []clientv3.Cmp{
		clientv3.Compare(clientv3.CreateRevision(k), "=", 0),
		clientv3.Compare(clientv3.CreateRevision(pk), ">", 0),
	}, clientv3.OpPut(k, string(e.active)), clientv3.OpPut(link, key)); err != nil {
		return err
	}
	return guardedTxn(ctx, kv, []clientv3.Cmp{
		clientv3.Compare(clientv3.CreateRevision(nk), "=", 0),
		clientv3.Compare(clientv3.CreateRevision(k), ">", 0),
	}, clientv3.OpDelete(k), clientv3.OpPut(nk, string(e.committed)), clientv3.OpPut(link, name))
}

// rawPrepareThenCommit is the least a driver's Prepare and later Commit of
// one layer need, as two transactions (the layer is unpacked in between):
// each reads what it depends on in one request and writes in one guarded
// Txn, four round trips in all.
func (e *etcdBench) rawPrepareThenCommit(ctx context.Context, kv clientv3.KV, round string, i int, parent string) error {
	key, name := fmt.Sprintf("%s-extract-%d", round, i), fmt.Sprintf("%s-layer-%d", round, i)
	k, nk, pk := rawKey(e.rawRoot, key), rawKey(e.rawRoot, name), rawKey(e.rawRoot, parent)
	link := rawChildPrefix(e.rawRoot, parent) + key
	r, err := kv.Txn(ctx).Then(clientv3.OpGet(k), clientv3.OpGet(pk)).Commit()
	if err != nil {
		return err
	}
	if len(r.Responses[0].GetResponseRange().Kvs) != 0 || len(r.Responses[1].GetResponseRange().Kvs) != 1 {
		return errRaw
	}
	p := r.Responses[1].GetResponseRange().Kvs[0]
	if err := guardedTxn(ctx, kv, []clientv3.Cmp{
		clientv3.Compare(clientv3.ModRevision(k), "=", 0),
		clientv3.Compare(clientv3.ModRevision(pk), "=", p.ModRevision),
	}, clientv3.OpPut(k, string(e.active)), clientv3.OpPut(link, key)); err != nil {
		return err
	}
	r, err = kv.Txn(ctx).Then(clientv3.OpGet(nk), clientv3.OpGet(k)).Commit()
	if err != nil {
		return err
	}
	if len(r.Responses[0].GetResponseRange().Kvs) != 0 || len(r.Responses[1].GetResponseRange().Kvs) != 1 {
		return errRaw
	}
	a := r.Responses[1].GetResponseRange().Kvs[0]
	if err := guardedTxn(ctx, kv, []clientv3.Cmp{
		clientv3.Compare(clientv3.ModRevision(nk), "=", 0),
		clientv3.Compare(clientv3.ModRevision(k), "=", a.ModRevision),
	}, clientv3.OpDelete(k), clientv3.OpPut(nk, string(e.committed)), clientv3.OpPut(link, name)); err != nil {
		return err
	}
	return nil
}

// ourPrepareThenCommit is a driver's Prepare and later Commit of one layer
// on our store: two transactions.
func ourPrepareThenCommit(ctx context.Context, ms storage.MetaStore, round string, i int, parent string) error {
	key := fmt.Sprintf("%s-extract-%d", round, i)
	err := ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, key, parent)
		return err
	})
	if err != nil {
		return err
	}
	return ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		_, err := storage.CommitActive(ctx, key, fmt.Sprintf("%s-layer-%d", round, i), snapshots.Usage{Size: 4096, Inodes: 2}, snapshots.WithLabels(benchLabels(i)))
		return err
	})
}

// ourCreateCommit is boltBench.createCommit on an etcd store.
func ourCreateCommit(ctx context.Context, ms storage.MetaStore, round string, i int, parent string) error {
	return ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		key := fmt.Sprintf("%s-extract-%d", round, i)
		if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, key, parent); err != nil {
			return err
		}
		_, err := storage.CommitActive(ctx, key, fmt.Sprintf("%s-layer-%d", round, i), snapshots.Usage{Size: 4096, Inodes: 2}, snapshots.WithLabels(benchLabels(i)))
		return err
	})
}

// rawRemove is the least a remove needs: one read of the record and of its
// first child, one guarded delete of the record and the parent link.
func (e *etcdBench) rawRemove(ctx context.Context, key, parent string) error {
	k := rawKey(e.rawRoot, key)
	r, err := e.raw.Txn(ctx).Then(
		clientv3.OpGet(k),
		clientv3.OpGet(rawChildPrefix(e.rawRoot, key), clientv3.WithPrefix(), clientv3.WithKeysOnly(), clientv3.WithLimit(1)),
	).Commit()
	if err != nil {
		return err
	}
	kvs := r.Responses[0].GetResponseRange().Kvs
	if len(kvs) != 1 || len(r.Responses[1].GetResponseRange().Kvs) != 0 {
		return errRaw
	}
	w, err := e.raw.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(k), "=", kvs[0].ModRevision)).Then(
		clientv3.OpDelete(k),
		clientv3.OpDelete(rawChildPrefix(e.rawRoot, parent)+key),
	).Commit()
	if err != nil {
		return err
	}
	if !w.Succeeded {
		return errRaw
	}
	return nil
}

// rawWalk reads [start, end) in pages at the first page's revision, as our
// engine does, without decoding: the least a walk needs.
func rawWalk(ctx context.Context, kv clientv3.KV, start, end string, pageSize int64) (int, error) {
	n := 0
	var rev int64
	for from := start; ; {
		opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(pageSize)}
		if rev != 0 {
			opts = append(opts, clientv3.WithRev(rev))
		}
		resp, err := kv.Get(ctx, from, opts...)
		if err != nil {
			return n, err
		}
		rev = resp.Header.Revision
		n += len(resp.Kvs)
		if !resp.More || len(resp.Kvs) == 0 {
			return n, nil
		}
		from = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
}

// reportTrips reports the round trips counted by n since it was reset.
func reportTrips(b *testing.B, n *atomic.Int64) {
	b.ReportMetric(float64(n.Load())/float64(b.N), "roundtrips/op")
}

// pair runs the raw and our variant of one operation as sub-benchmarks.
func (e *etcdBench) pair(b *testing.B, raw, ours func(b *testing.B)) {
	b.Run("impl=raw", func(b *testing.B) {
		b.ReportAllocs()
		raw(b)
		reportTrips(b, &e.rawN)
	})
	b.Run("impl=snapmeta", func(b *testing.B) {
		b.ReportAllocs()
		ours(b)
		reportTrips(b, &e.ourN)
	})
}

// withCache runs ours as impl=snapmeta-cache, on the store with the watch
// cache, after the raw and our variants (pair).
func (e *etcdBench) withCache(b *testing.B, ours func(b *testing.B, ms storage.MetaStore)) {
	b.Run("impl=snapmeta-cache", func(b *testing.B) {
		b.ReportAllocs()
		ours(b, e.cached)
		reportTrips(b, &e.cacheN)
	})
}

// resetTimer resets the timer and the round trip counters.
func (e *etcdBench) resetTimer(b *testing.B) {
	b.ResetTimer()
	e.ourN.Store(0)
	e.rawN.Store(0)
	e.cacheN.Store(0)
}

// benchRead compares a read-only transaction of ours, without and with the
// watch cache, with one raw Get of the record it reads.
func (e *etcdBench) benchRead(b *testing.B, name string, ours func(ctx context.Context) error) {
	ctx := context.Background()
	key := etcdSnapshotKey(e.root, name)
	run := func(b *testing.B, ms storage.MetaStore) {
		e.resetTimer(b)
		for range b.N {
			if err := ms.WithTransaction(ctx, false, ours); err != nil {
				b.Fatal(err)
			}
		}
	}
	e.pair(b, func(b *testing.B) {
		e.resetTimer(b)
		for range b.N {
			resp, err := e.raw.Get(ctx, key)
			if err != nil || len(resp.Kvs) != 1 {
				b.Fatal(err, errRaw)
			}
		}
	}, func(b *testing.B) { run(b, e.ms) })
	e.withCache(b, run)
}

func BenchmarkEtcdStatActive(b *testing.B) {
	e := openEtcdBench(b)
	e.benchRead(b, "active", func(ctx context.Context) error { _, _, _, err := storage.GetInfo(ctx, "active"); return err })
}

func BenchmarkEtcdStatCommitted(b *testing.B) {
	e := openEtcdBench(b)
	e.benchRead(b, "base", func(ctx context.Context) error { _, _, _, err := storage.GetInfo(ctx, "base"); return err })
}

func BenchmarkEtcdGetSnapshot(b *testing.B) {
	e := openEtcdBench(b)
	for _, depth := range benchDepths {
		b.Run(fmt.Sprintf("depth=%d", depth), func(b *testing.B) {
			e.benchRead(b, chainTop(depth), func(ctx context.Context) error {
				s, err := storage.GetSnapshot(ctx, chainTop(depth))
				if err == nil && len(s.ParentIDs) != depth {
					err = fmt.Errorf("%d parents, want %d", len(s.ParentIDs), depth)
				}
				return err
			})
		})
	}
}

// benchCreate compares creating actives, one write transaction each, on
// the parents parent(i) of each side.
func (e *etcdBench) benchCreate(b *testing.B, rawParent, ourParent func(b *testing.B, round string) func(i int) string) {
	ctx := context.Background()
	e.pair(b, func(b *testing.B) {
		round := etcdRound()
		parent := rawParent(b, round)
		e.resetTimer(b)
		for i := range b.N {
			if err := e.rawCreate(ctx, fmt.Sprintf("%s-prepare-%d", round, i), parent(i)); err != nil {
				b.Fatal(err)
			}
		}
	}, func(b *testing.B) {
		round := etcdRound()
		parent := ourParent(b, round)
		e.resetTimer(b)
		for i := range b.N {
			key := fmt.Sprintf("%s-prepare-%d", round, i)
			err := e.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
				_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, key, parent(i))
				return err
			})
			if err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkEtcdCreateActive is a driver's Prepare on a parent with few
// children (at most benchChildren).
func BenchmarkEtcdCreateActive(b *testing.B) {
	e := openEtcdBench(b)
	e.benchCreate(b,
		func(b *testing.B, round string) func(int) string { return e.rawParents(b, round, b.N) },
		func(b *testing.B, round string) func(int) string { return e.ourParents(b, round, b.N) })
}

// BenchmarkEtcdCreateActiveBusyParent is a driver's Prepare on a parent
// that already has benchBusyChildren children (an image many containers
// run from).
func BenchmarkEtcdCreateActiveBusyParent(b *testing.B) {
	e := openEtcdBench(b)
	etcdBusyOnce.Do(func() {
		etcdBusyErr = e.ms.WithTransaction(context.Background(), true, func(ctx context.Context) error {
			return etcdLayer(ctx, "busy", "", benchLabels(0))
		})
		if etcdBusyErr == nil {
			etcdBusyErr = etcdBatch(e.ms, benchBusyChildren, func(ctx context.Context, i int) error {
				_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, fmt.Sprintf("busy-child-%d", i), "busy")
				return err
			})
		}
		if etcdBusyErr == nil {
			_, etcdBusyErr = e.cli.Put(context.Background(), rawKey(e.rawRoot, "busy"), string(e.committed))
		}
	})
	require.NoError(b, etcdBusyErr)
	busy := func(*testing.B, string) func(int) string { return func(int) string { return "busy" } }
	e.benchCreate(b, busy, busy)
}

func BenchmarkEtcdCreateCommit(b *testing.B) {
	e := openEtcdBench(b)
	ctx := context.Background()
	e.pair(b, func(b *testing.B) {
		round := etcdRound()
		parent := e.rawParents(b, round, b.N)
		e.resetTimer(b)
		for i := range b.N {
			if err := e.rawCreateCommit(ctx, e.raw, round, i, parent(i)); err != nil {
				b.Fatal(err)
			}
		}
	}, func(b *testing.B) {
		round := etcdRound()
		parent := e.ourParents(b, round, b.N)
		e.resetTimer(b)
		for i := range b.N {
			if err := ourCreateCommit(ctx, e.ms, round, i, parent(i)); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkEtcdRemove removes actives, one write transaction each, created
// (untimed) beforehand.
func BenchmarkEtcdRemove(b *testing.B) {
	e := openEtcdBench(b)
	ctx := context.Background()
	e.pair(b, func(b *testing.B) {
		round := etcdRound()
		parent := e.rawParents(b, round, b.N)
		name := func(i int) string { return fmt.Sprintf("%s-remove-%d", round, i) }
		for lo := 0; lo < b.N; lo += 64 {
			var ops []clientv3.Op
			for i := lo; i < min(lo+64, b.N); i++ {
				ops = append(ops,
					clientv3.OpPut(rawKey(e.rawRoot, name(i)), string(e.active)),
					clientv3.OpPut(rawChildPrefix(e.rawRoot, parent(i))+name(i), name(i)))
			}
			_, err := e.cli.Txn(ctx).Then(ops...).Commit()
			require.NoError(b, err)
		}
		e.resetTimer(b)
		for i := range b.N {
			if err := e.rawRemove(ctx, name(i), parent(i)); err != nil {
				b.Fatal(err)
			}
		}
	}, func(b *testing.B) {
		round := etcdRound()
		parent := e.ourParents(b, round, b.N)
		name := func(i int) string { return fmt.Sprintf("%s-remove-%d", round, i) }
		require.NoError(b, etcdBatch(e.ms, b.N, func(ctx context.Context, i int) error {
			_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, name(i), parent(i))
			return err
		}))
		e.resetTimer(b)
		for i := range b.N {
			err := e.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
				_, _, err := storage.Remove(ctx, name(i))
				return err
			})
			if err != nil {
				b.Fatal(err)
			}
		}
	})
}

// benchWalk compares walks of root: raw paged reads against WalkInfo.
func (e *etcdBench) benchWalk(b *testing.B, root string, want int, filters []string, wantOurs int, heap bool) {
	ctx := context.Background()
	start := etcdPrefix(root) + storage.KeyEtcdSnapshots + "/"
	end := etcdPrefix(root) + storage.KeyEtcdSnapshots + "0"
	ms, err := storage.NewEtcdStoreFromClient(e.cli, root, countingWrapper(&e.ourN))
	require.NoError(b, err)
	defer ms.Close()
	measure := func(b *testing.B, walk func() error) {
		var h *heapPeak
		if heap {
			h = startHeapPeak()
		}
		e.resetTimer(b)
		for range b.N {
			if err := walk(); err != nil {
				b.Fatal(err)
			}
		}
		b.StopTimer()
		if heap {
			h.report(b)
		}
	}
	e.pair(b, func(b *testing.B) {
		measure(b, func() error {
			n, err := rawWalk(ctx, e.raw, start, end, storage.DefaultEtcdPageSize)
			if err == nil && n != want {
				err = fmt.Errorf("walked %d, want %d", n, want)
			}
			return err
		})
	}, func(b *testing.B) {
		var n int
		fn := func(ctx context.Context) error {
			n = 0
			return storage.WalkInfo(ctx, walkCount(&n), filters...)
		}
		measure(b, func() error {
			err := ms.WithTransaction(ctx, false, fn)
			if err == nil && n != wantOurs {
				err = fmt.Errorf("walked %d, want %d", n, wantOurs)
			}
			return err
		})
	})
}

// BenchmarkEtcdWalk walks benchWalkSize snapshots, all of them or with a
// label filter. Raw etcd cannot filter on the server: it reads them all
// either way.
func BenchmarkEtcdWalk(b *testing.B) {
	e := openEtcdBench(b)
	etcdWalkOnce.Do(func() {
		etcdWalkRoot = "bench/walk10k"
		etcdWalkErr = buildEtcdWalk(b, etcdWalkRoot, benchWalkSize)
	})
	require.NoError(b, etcdWalkErr)
	b.Run("filter=none", func(b *testing.B) {
		e.benchWalk(b, etcdWalkRoot, benchWalkSize, nil, benchWalkSize, false)
	})
	b.Run("filter=label", func(b *testing.B) {
		e.benchWalk(b, etcdWalkRoot, benchWalkSize, []string{benchWalkFilter}, benchWalkSize/benchSelectEvery, false)
	})
}

// BenchmarkEtcdClients runs a driver's create+commit of a layer (Prepare,
// then Commit: two transactions, as unpackers do) from several clients at
// once, each with its own connection (and, for ours, its own store on one
// root): several hosts sharing the store. ns/op is wall time per layer.
func BenchmarkEtcdClients(b *testing.B) {
	e := openEtcdBench(b)
	const maxClients = 128
	clis := make([]*clientv3.Client, maxClients)
	for i := range clis {
		clis[i] = newEtcdClient(b)
	}
	ctx := context.Background()
	for _, clients := range []int{1, 8, 32, 128} {
		b.Run(fmt.Sprintf("clients=%d", clients), func(b *testing.B) {
			b.Run("impl=raw", func(b *testing.B) {
				b.ReportAllocs()
				round := etcdRound()
				parent := e.rawParents(b, round, b.N)
				var n atomic.Int64
				kvs := make([]clientv3.KV, clients)
				for i := range kvs {
					kvs[i] = countingKV{KV: clis[i].KV, n: &n}
				}
				runWriters(b, clients, func(w, i int) error {
					return e.rawPrepareThenCommit(ctx, kvs[w], round, i, parent(i))
				})
				reportTrips(b, &n)
			})
			// The physical limit, two guarded Txns, without and with a
			// watch of the root per client: what following the root
			// costs every write, whoever follows it.
			for _, watched := range []bool{false, true} {
				name := "raw2txn"
				if watched {
					name += "-watched"
				}
				b.Run("impl="+name, func(b *testing.B) {
					b.ReportAllocs()
					round := etcdRound()
					parent := e.rawParents(b, round, b.N)
					var n atomic.Int64
					kvs := make([]clientv3.KV, clients)
					for i := range kvs {
						kvs[i] = countingKV{KV: clis[i].KV, n: &n}
						if watched {
							wctx, cancel := context.WithCancel(ctx)
							defer cancel()
							wch := clis[i].Watch(wctx, e.rawRoot+"/", clientv3.WithPrefix())
							go func() {
								for range wch {
								}
							}()
						}
					}
					runWriters(b, clients, func(w, i int) error {
						return e.rawTwoTxns(ctx, kvs[w], round, i, parent(i))
					})
					reportTrips(b, &n)
				})
			}
			for _, impl := range []struct {
				name string
				opts []storage.EtcdOpt
			}{
				{"snapmeta", nil},
				{"snapmeta-cache", []storage.EtcdOpt{storage.WithWatchCache()}},
			} {
				b.Run("impl="+impl.name, func(b *testing.B) {
					b.ReportAllocs()
					round := etcdRound()
					parent := e.ourParents(b, round, b.N)
					var n atomic.Int64
					stores := make([]storage.MetaStore, clients)
					for i := range stores {
						ms, err := storage.NewEtcdStoreFromClient(clis[i], e.root, append(impl.opts, countingWrapper(&n))...)
						require.NoError(b, err)
						defer ms.Close()
						stores[i] = ms
						if storage.WatchCached(ms) {
							// The copy's first list is not the
							// benchmark's work.
							require.NoError(b, storage.WaitWatchCache(ctx, ms))
						}
					}
					// The round trips of the work: not the copies' lists.
					n.Store(0)
					runWriters(b, clients, func(w, i int) error {
						return ourPrepareThenCommit(ctx, stores[w], round, i, parent(i))
					})
					reportTrips(b, &n)
				})
			}
		})
	}
}

// BenchmarkEtcdWalk100k walks 100k snapshots and reports the peak heap of
// the walk (see heapPeak). Building them takes a while, once per process;
// it comes last because the 100k records make the embedded server's heap,
// which is this process's, larger for everything after.
func BenchmarkEtcdWalk100k(b *testing.B) {
	e := openEtcdBench(b)
	etcdWalk100kOnce.Do(func() {
		start := time.Now()
		etcdWalk100kRoot = "bench/walk100k"
		etcdWalk100kErr = buildEtcdWalk(b, etcdWalk100kRoot, benchWalk100k)
		b.Logf("built %d snapshots in %v", benchWalk100k, time.Since(start).Round(time.Millisecond))
	})
	require.NoError(b, etcdWalk100kErr)
	e.benchWalk(b, etcdWalk100kRoot, benchWalk100k, nil, benchWalk100k, true)
}
