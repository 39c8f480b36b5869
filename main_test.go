package storage_test

import (
	"context"
	"fmt"
	"os"
	"testing"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/snapmeta/storage/etcdtest"
)

// TestMain stops the shared embedded etcd (and the benchmarks') after the
// tests and fails the run
// if any goroutine outlives them: every store and client must be closed.
//
// With SNAPMETA_BENCH_ETCD_CHILD set, the binary is instead the etcd server
// of a parent's BenchmarkScale (bench_etcdproc_test.go).
func TestMain(m *testing.M) {
	if dir := os.Getenv(benchEtcdChildEnv); dir != "" {
		os.Exit(runBenchEtcdChild(dir))
	}
	code := m.Run()
	if sharedEtcd != nil {
		sharedEtcd.Close()
	}
	if benchEtcd != nil {
		benchEtcd.Close()
	}
	if code == 0 {
		if err := goleak.Find(etcdtest.GoleakIgnores...); err != nil {
			fmt.Fprintf(os.Stderr, "goroutines outlived the tests: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

// TestEtcdStoreCloseStopsItsGoroutines checks that a store owning its
// client leaves no goroutine behind once closed.
func TestEtcdStoreCloseStopsItsGoroutines(t *testing.T) {
	etcdServer(t)
	// The server's own goroutines come and go; the client's must go.
	ignore := []goleak.Option{
		goleak.IgnoreCurrent(),
		goleak.IgnoreAnyFunction("go.etcd.io/etcd/server/v3/embed.(*serveCtx).startHandler.func1"),
		goleak.IgnoreAnyFunction("go.etcd.io/etcd/server/v3/etcdserver.(*EtcdServer).GoAttach.func1"),
	}
	ms := openEtcd(t, uniqueRoot(t))
	update(t, ms, func(ctx context.Context) error { return commitLayer(ctx, "base", "") })
	require.NoError(t, ms.Close())
	goleak.VerifyNone(t, ignore...)
}
