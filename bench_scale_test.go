package storage_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/stretchr/testify/require"

	"github.com/snapmeta/storage"
)

// BenchmarkScale measures how costs grow with the store (issue 16, item 6):
// for each size (SNAPMETA_BENCH_SCALE, a comma-separated list such as
// 10000,100000,1000000; the benchmark skips itself when it is unset, as it
// takes minutes to most of an hour: scripts/bench.sh runs it with SCALE
// set and keeps its output in docs/scale.txt) and each engine, it
// builds a store of that many snapshots (committed layers in chains of 10,
// and an active on every tenth) and reports, per snapshot, the time of
// creating them, of a whole-store Walk, of Check, of an export (Walk
// encoding JSON Lines), of one GetSnapshot on a random active and of a
// migrate (Walk into Import on a new store); plus the peak heap of the
// walk, Check and export. Flat ns/snapshot across sizes means cost
// that grows with the work; a bounded peak heap means memory bounded by a
// page, not the store.
//
// The store is built with CreateSnapshot and CommitActive, as drivers
// write: on bbolt by one writer in transactions of 1000 layers, on etcd by
// 8 writers in transactions of 40 (etcd's 128 operations per transaction),
// after which the etcd history is compacted. "create" is the build's wall
// time per snapshot.
//
// With SNAPMETA_BENCH_ETCD_PROCESS=1 the etcd server runs in a child
// process (this test binary, see TestMain), a new one for each size, so
// that its CPU and heap are not counted here and no size's data weighs on
// the next; the create step then reports the server's resident memory
// (server-rss-MiB). Without it, every size shares the benchmarks'
// in-process server.
func BenchmarkScale(b *testing.B) {
	v := os.Getenv("SNAPMETA_BENCH_SCALE")
	if v == "" {
		b.Skip("SNAPMETA_BENCH_SCALE is unset (e.g. 10000,100000)")
	}
	var sizes []int
	for _, f := range strings.Split(v, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		require.NoError(b, err, "SNAPMETA_BENCH_SCALE")
		sizes = append(sizes, n)
	}
	engines := []struct {
		name  string
		start func(b *testing.B) scaleEngine
		build scaleBuilder
	}{
		{"bolt", func(*testing.B) scaleEngine { return scaleBolt{} }, scaleBuilder{perTx: 1000, writers: 1}},
		{"etcd", newScaleEtcd, scaleBuilder{perTx: 40, writers: 8}},
	}
	for _, n := range sizes {
		for _, eng := range engines {
			b.Run(fmt.Sprintf("n=%d/engine=%s", n, eng.name), func(b *testing.B) {
				srv := eng.start(b)
				ms := srv.open(b, "src")
				perSnapshot := func(b *testing.B, d time.Duration) {
					b.ReportMetric(float64(d.Nanoseconds())/float64(n), "ns/snapshot")
				}
				// Built once, timed: a sub-benchmark reports it, since
				// building again on each of its rounds would need as many
				// stores.
				start := time.Now()
				actives := eng.build.build(b, ms, n)
				built := time.Since(start)
				srv.afterBuild(b)
				b.Run("create", func(b *testing.B) {
					for b.Loop() {
					}
					perSnapshot(b, built)
					if rss := srv.serverMiB(); !math.IsNaN(rss) {
						b.ReportMetric(rss, "server-rss-MiB")
					}
				})
				b.Run("walk", func(b *testing.B) {
					h := startHeapPeak()
					for b.Loop() {
						start := time.Now()
						count := 0
						require.NoError(b, ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
							return storage.Walk(ctx, func(storage.Record) error { count++; return nil })
						}))
						require.Equal(b, n, count)
						perSnapshot(b, time.Since(start))
					}
					h.report(b)
				})
				b.Run("Check", func(b *testing.B) {
					h := startHeapPeak()
					for b.Loop() {
						start := time.Now()
						problems, err := storage.Check(context.Background(), ms)
						require.NoError(b, err)
						require.Empty(b, problems)
						perSnapshot(b, time.Since(start))
					}
					h.report(b)
				})
				b.Run("export", func(b *testing.B) {
					h := startHeapPeak()
					for b.Loop() {
						start := time.Now()
						enc := json.NewEncoder(io.Discard)
						require.NoError(b, ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
							return storage.Walk(ctx, func(r storage.Record) error { return enc.Encode(r) })
						}))
						perSnapshot(b, time.Since(start))
					}
					h.report(b)
				})
				b.Run("GetSnapshot", func(b *testing.B) {
					// Lookups of random actives, each in its own
					// transaction, 1000 per round so that -benchtime 1x
					// still averages, after 200 untimed ones. It runs
					// after the walks, which touched every page of the
					// bbolt file: in a fresh process each lookup of a
					// large file first faults in pages of its mapping
					// (some 50 µs a lookup at 1M snapshots on a VM),
					// which a daemon pays once. faults/lookup counts
					// the page faults left. ns/snapshot is one lookup's
					// time.
					const lookups = 1000
					lookup := func() {
						key := actives[rand.IntN(len(actives))]
						require.NoError(b, ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
							_, err := storage.GetSnapshot(ctx, key)
							return err
						}))
					}
					for range 200 {
						lookup()
					}
					faults := minorFaults()
					for b.Loop() {
						for range lookups {
							lookup()
						}
					}
					if f := minorFaults(); !math.IsNaN(f) {
						b.ReportMetric((f-faults)/float64(b.N*lookups), "faults/lookup")
					}
					b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*lookups), "ns/snapshot")
				})
				b.Run("migrate", func(b *testing.B) {
					for b.Loop() {
						dst := srv.open(b, "dst")
						start := time.Now()
						scaleMigrate(b, ms, dst)
						perSnapshot(b, time.Since(start))
					}
				})
			})
		}
	}
}

// scaleEngine is an engine of BenchmarkScale, started for one size.
type scaleEngine interface {
	// open opens a new empty store, closed at b's cleanup.
	open(b *testing.B, tag string) storage.MetaStore
	// afterBuild tidies the engine once the store is built.
	afterBuild(b *testing.B)
	// serverMiB is the resident memory of the engine's server, NaN when
	// unknown or none.
	serverMiB() float64
}

type scaleBolt struct{}

func (scaleBolt) open(b *testing.B, _ string) storage.MetaStore {
	ms, err := storage.NewBoltMetaStore(filepath.Join(b.TempDir(), "metadata.db"))
	require.NoError(b, err)
	b.Cleanup(func() { _ = ms.Close() })
	return ms
}

func (scaleBolt) afterBuild(*testing.B) {}

func (scaleBolt) serverMiB() float64 { return math.NaN() }

// scaleBuilder fills a store: writers goroutines, each with its share of
// the transactions of perTx snapshots (a multiple of 10, so that a chain
// never spans two).
type scaleBuilder struct {
	perTx, writers int
}

// build fills ms with n snapshots: committed layers in chains of 10 and an
// active on every tenth layer. It returns the actives' names.
func (sb scaleBuilder) build(b *testing.B, ms storage.MetaStore, n int) []string {
	txs := (n + sb.perTx - 1) / sb.perTx
	var next atomic.Int64
	errs := make([]error, sb.writers)
	var wg sync.WaitGroup
	for w := range sb.writers {
		wg.Go(func() {
			for {
				tx := int(next.Add(1)) - 1
				if tx >= txs {
					return
				}
				lo, hi := tx*sb.perTx, min((tx+1)*sb.perTx, n)
				errs[w] = ms.WithTransaction(context.Background(), true, func(ctx context.Context) error {
					for i := lo; i < hi; i++ {
						if err := scaleCreate(ctx, i); err != nil {
							return err
						}
					}
					return nil
				})
				if errs[w] != nil {
					return
				}
			}
		})
	}
	wg.Wait()
	require.NoError(b, errors.Join(errs...))
	var actives []string
	for i := 9; i < n; i += 10 {
		actives = append(actives, fmt.Sprintf("s%08d", i))
	}
	return actives
}

// scaleCreate creates snapshot i of the store scaleBuilder fills.
func scaleCreate(ctx context.Context, i int) error {
	name := fmt.Sprintf("s%08d", i)
	if i%10 == 9 {
		_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, name, fmt.Sprintf("s%08d", i-1))
		return err
	}
	parent := ""
	if i%10 != 0 {
		parent = fmt.Sprintf("s%08d", i-1)
	}
	if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, name+"-x", parent); err != nil {
		return err
	}
	_, err := storage.CommitActive(ctx, name+"-x", name, snapshots.Usage{Size: 4096, Inodes: 2})
	return err
}

// scaleMigrate copies src into dst as snapmeta migrate does: one paged walk,
// imports in batches of 40 (parents come before children in name order
// here), then the ID high-water mark.
func scaleMigrate(b *testing.B, src, dst storage.MetaStore) {
	var batch []storage.Record
	flush := func() {
		if len(batch) == 0 {
			return
		}
		recs := batch
		require.NoError(b, dst.WithTransaction(context.Background(), true, func(ctx context.Context) error {
			return storage.Import(ctx, recs...)
		}))
		batch = nil
	}
	var limit uint64
	require.NoError(b, src.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		var err error
		if limit, err = storage.IDLimit(ctx); err != nil {
			return err
		}
		return storage.Walk(ctx, func(r storage.Record) error {
			batch = append(batch, r)
			if len(batch) == 40 {
				flush()
			}
			return nil
		})
	}))
	flush()
	require.NoError(b, dst.WithTransaction(context.Background(), true, func(ctx context.Context) error {
		return storage.RaiseIDs(ctx, limit)
	}))
}
