package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/etcdtest"
	clientv3 "go.etcd.io/etcd/client/v3"
)

var benchSnapshots = flag.Int("bench-snapshots", 10000, "snapshots in the store of BenchmarkWholeStoreOnEtcd")

// BenchmarkWholeStoreOnEtcd times ls, tree, export and check, each a whole
// run of the tool (connecting included), over -bench-snapshots snapshots
// (9 in 10 committed, in chains of 10) on an embedded etcd, against a plain
// paged clientv3 read of the same keys (pages of 1000 at one revision, as
// the store reads them). Each command reports its time as a multiple of the
// plain read's (x-raw).
//
//	go test -run '^$' -bench WholeStoreOnEtcd ./cmd/snapmeta/ -bench-snapshots 100000
func BenchmarkWholeStoreOnEtcd(b *testing.B) {
	n := *benchSnapshots
	c := etcdtest.Start(b)
	const root = "bench"
	cfg := c.ClientConfig()
	ms, err := storage.NewEtcdStore(root, &cfg)
	if err != nil {
		b.Fatal(err)
	}
	fillBench(b, ms, n)
	if err := ms.Close(); err != nil {
		b.Fatal(err)
	}
	addr := "etcd://" + strings.TrimPrefix(c.Endpoint(0), "http://") + "/" + root
	cli := c.Client(b)

	var raw time.Duration
	b.Run("raw", func(b *testing.B) {
		start := root + "/" + storage.KeyEtcdVersion + "/" + storage.KeyEtcdSnapshots + "/"
		end := root + "/" + storage.KeyEtcdVersion + "/" + storage.KeyEtcdSnapshots + "0"
		for b.Loop() {
			got, rev := 0, int64(0)
			for from := start; ; {
				opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(1000)}
				if rev != 0 {
					opts = append(opts, clientv3.WithRev(rev))
				}
				resp, err := cli.Get(context.Background(), from, opts...)
				if err != nil {
					b.Fatal(err)
				}
				rev = resp.Header.Revision
				got += len(resp.Kvs)
				if !resp.More || len(resp.Kvs) == 0 {
					break
				}
				from = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
			}
			if got != n {
				b.Fatalf("read %d keys, want %d", got, n)
			}
		}
		raw = b.Elapsed() / time.Duration(b.N)
	})
	for _, cmd := range []string{"ls", "tree", "export", "check"} {
		b.Run(cmd, func(b *testing.B) {
			for b.Loop() {
				if code := run(context.Background(), []string{cmd, "--store", addr}, strings.NewReader(""), io.Discard, io.Discard); code != 0 {
					b.Fatalf("snapmeta %s: exit %d", cmd, code)
				}
			}
			if raw > 0 {
				b.ReportMetric(float64(b.Elapsed()/time.Duration(b.N))/float64(raw), "x-raw")
			}
		})
	}
}

// fillBench imports n snapshots into ms: chains of 10, the last of each
// chain active, the others committed with a usage.
func fillBench(b *testing.B, ms storage.MetaStore, n int) {
	b.Helper()
	now := time.Now().UTC()
	recs := make([]storage.Record, 0, n)
	for i := range n {
		r := storage.Record{
			Name: fmt.Sprintf("sha256:%064d", i), ID: fmt.Sprint(i + 1), Kind: snapshots.KindCommitted,
			Labels:  map[string]string{"containerd.io/snapshot.ref": fmt.Sprint(i)},
			Created: now, Updated: now, Usage: snapshots.Usage{Size: int64(i) << 10, Inodes: int64(i)},
		}
		if i%10 != 0 {
			r.Parent = recs[i-1].Name
		}
		if i%10 == 9 {
			r.Kind, r.Usage = snapshots.KindActive, snapshots.Usage{}
		}
		recs = append(recs, r)
	}
	// 30 records a transaction stay within etcd's 128 operations.
	for start := 0; start < n; start += 30 {
		batch := recs[start:min(start+30, n)]
		if err := ms.WithTransaction(context.Background(), true, func(ctx context.Context) error {
			return storage.Import(ctx, batch...)
		}); err != nil {
			b.Fatal(err)
		}
	}
}
