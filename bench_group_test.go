package storage_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	bolt "go.etcd.io/bbolt"

	"github.com/snapmeta/storage"
)

// BenchmarkGroupCeiling measures what limits the group commit of the bbolt
// engine, next to containerd's store in the same run: the disk's rate of
// commits (impl=fsync: what one bbolt commit syncs, a page written and
// synced, then a meta page written and synced), raw bbolt Batch doing the
// writes of one create+commit per call (impl=bbolt-batch), and this
// package's store (impl=snapmeta, which reports the members per group
// commit). It runs only with SNAPMETA_BENCH_CEILING=1, so that
// scripts/bench.sh, which renders every Bolt* benchmark, does not.
func BenchmarkGroupCeiling(b *testing.B) {
	if os.Getenv("SNAPMETA_BENCH_CEILING") != "1" {
		b.Skip("set SNAPMETA_BENCH_CEILING=1")
	}
	ctrd := openBoltBench(b, boltImpls[0])
	ours := openBoltBench(b, boltImpls[1])
	ms, err := storage.NewBoltMetaStore(filepath.Join(b.TempDir(), "metadata.db"))
	require.NoError(b, err)
	b.Cleanup(func() { _ = ms.Close() })
	ours.withTx = func(ctx context.Context, writable bool, fn func(context.Context) error) error {
		return ms.WithTransaction(ctx, writable, fn)
	}
	ours.update(b, func(ctx context.Context) error {
		return ours.layer(ctx, "base", "", benchLabels(0))
	})

	db := openRawBolt(b)

	f, err := os.Create(filepath.Join(b.TempDir(), "fsync"))
	require.NoError(b, err)
	b.Cleanup(func() { _ = f.Close() })

	for _, writers := range []int{1, 16, 64} {
		b.Run(fmt.Sprintf("writers=%d", writers), func(b *testing.B) {
			b.Run("impl=containerd", func(b *testing.B) {
				b.ReportAllocs()
				round, parent := ctrd.parents(b, b.N)
				runWriters(b, writers, func(_ int, i int) error {
					return ctrd.createCommit(context.Background(), round, i, parent(i))
				})
			})
			if writers == 1 {
				b.Run("impl=fsync", func(b *testing.B) {
					page := make([]byte, 4096)
					for i := 0; b.Loop(); i++ {
						for _, off := range []int64{int64(4096 * (2 + i%64)), int64(4096 * (i % 2))} {
							if _, err := f.WriteAt(page, off); err != nil {
								b.Fatal(err)
							}
							if err := f.Sync(); err != nil {
								b.Fatal(err)
							}
						}
					}
				})
			}
			b.Run("impl=bbolt-batch", func(b *testing.B) {
				b.ReportAllocs()
				round := fmt.Sprintf("r%d", time.Now().UnixNano())
				runWriters(b, writers, func(_ int, i int) error {
					return db.Batch(func(tx *bolt.Tx) error { return rawCreateCommit(tx, round, i) })
				})
			})
			b.Run("impl=snapmeta", func(b *testing.B) {
				b.ReportAllocs()
				round, parent := ours.parents(b, b.N)
				c0, s0 := storage.GroupCommits(ms)
				runWriters(b, writers, func(_ int, i int) error {
					return ours.createCommit(context.Background(), round, i, parent(i))
				})
				if c1, s1 := storage.GroupCommits(ms); c1 > c0 {
					b.ReportMetric(float64(s1-s0)/float64(c1-c0), "members/commit")
				}
			})
		})
	}
}
