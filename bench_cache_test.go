package storage_test

import (
	"context"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/snapmeta/storage"
)

// BenchmarkEtcdWalk100kServerApart walks 100k snapshots on an etcd server
// in another process (the test binary run again as one, see
// bench_etcdproc_test.go), so that the heap figures are the client's
// alone: raw paged reads, our store reading etcd, and our store with the
// watch cache, which reads its copy. The cached store also reports what
// its copy holds: cache-MiB (the live heap the copy added, after a GC) and
// cache-B/snapshot.
func BenchmarkEtcdWalk100kServerApart(b *testing.B) {
	apartOnce.Do(func() {
		// Once per process (-count runs the benchmark again); the child
		// exits with this process, when its standard input closes. It
		// stays referenced: a collected pipe would close that input.
		if apartChild, apartErr = startEtcdChild(); apartErr != nil {
			return
		}
		apartCfg = clientv3.Config{Endpoints: []string{apartChild.endpoint}, DialTimeout: 10 * time.Second, Logger: zap.NewNop()}
		start := time.Now()
		apartErr = buildEtcdWalkOn(apartCfg, apartRoot, benchWalk100k)
		b.Logf("built %d snapshots in %v", benchWalk100k, time.Since(start).Round(time.Millisecond))
	})
	require.NoError(b, apartErr)
	cfg, root := apartCfg, apartRoot
	cli, err := clientv3.New(cfg)
	require.NoError(b, err)
	b.Cleanup(func() { _ = cli.Close() })
	ctx := context.Background()

	measure := func(b *testing.B, walk func() (int, error)) {
		h := startHeapPeak()
		b.ResetTimer()
		for range b.N {
			n, err := walk()
			require.NoError(b, err)
			require.Equal(b, benchWalk100k, n)
		}
		b.StopTimer()
		h.report(b)
	}
	ourWalk := func(ms storage.MetaStore) func() (int, error) {
		return func() (int, error) {
			var n int
			err := ms.WithTransaction(ctx, false, func(ctx context.Context) error {
				return storage.WalkInfo(ctx, walkCount(&n))
			})
			return n, err
		}
	}
	b.Run("impl=raw", func(b *testing.B) {
		b.ReportAllocs()
		start := etcdPrefix(root) + storage.KeyEtcdSnapshots + "/"
		end := etcdPrefix(root) + storage.KeyEtcdSnapshots + "0"
		measure(b, func() (int, error) { return rawWalk(ctx, cli.KV, start, end, storage.DefaultEtcdPageSize) })
	})
	b.Run("impl=snapmeta", func(b *testing.B) {
		b.ReportAllocs()
		ms, err := storage.NewEtcdStoreFromClient(cli, root, storage.WithoutWatchCache())
		require.NoError(b, err)
		defer ms.Close()
		measure(b, ourWalk(ms))
	})
	b.Run("impl=snapmeta-cache", func(b *testing.B) {
		b.ReportAllocs()
		before := liveHeap()
		ms, err := storage.NewEtcdStoreFromClient(cli, root, storage.WithWatchCache())
		require.NoError(b, err)
		defer ms.Close()
		require.NoError(b, storage.WaitWatchCache(ctx, ms))
		held := liveHeap() - before
		measure(b, ourWalk(ms))
		b.ReportMetric(float64(held)/(1<<20), "cache-MiB")
		b.ReportMetric(float64(held)/benchWalk100k, "cache-B/snapshot")
	})
}

var (
	apartOnce  sync.Once
	apartChild *etcdChild
	apartCfg   clientv3.Config
	apartErr   error
)

const apartRoot = "bench/walk100k-apart"

// liveHeap is the live heap after a collection.
func liveHeap() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}
