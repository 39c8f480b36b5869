package etcdtest_test

import (
	"context"
	"errors"
	"net"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snapmeta/storage/etcdtest"
)

// TestMain checks that the clusters of all tests leave no goroutine behind
// besides the documented ones.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, etcdtest.GoleakIgnores...)
}

// opTimeout bounds single requests that are expected to succeed.
const opTimeout = 10 * time.Second

func ctxTimeout(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func put(t *testing.T, cli *clientv3.Client, key, val string) {
	t.Helper()
	_, err := cli.Put(ctxTimeout(t, opTimeout), key, val)
	require.NoError(t, err, "put %q", key)
}

func get(t *testing.T, cli *clientv3.Client, key string) string {
	t.Helper()
	resp, err := cli.Get(ctxTimeout(t, opTimeout), key)
	require.NoError(t, err, "get %q", key)
	require.Len(t, resp.Kvs, 1, "get %q", key)
	return string(resp.Kvs[0].Value)
}

func TestSingleMemberRoundTrip(t *testing.T) {
	c := etcdtest.Start(t)
	require.Equal(t, 1, c.N())
	require.Equal(t, 0, c.Leader())
	eps := c.Endpoints()
	require.Len(t, eps, 1)
	assert.True(t, strings.HasPrefix(eps[0], "http://127.0.0.1:"), eps[0])
	assert.Equal(t, eps[0], c.Endpoint(0))
	require.NotNil(t, c.Member(0))

	cli := c.Client(t)
	tests := []struct {
		name, key, val string
	}{
		{"simple", "k", "v"},
		{"empty value", "empty", ""},
		{"binary", "bin\x00key", "\x00\xff\x01"},
		{"large", "large", strings.Repeat("x", 512<<10)},
		{"overwrite", "k", "v2"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			put(t, cli, tt.key, tt.val)
			assert.Equal(t, tt.val, get(t, cli, tt.key))
		})
	}
}

func TestOptions(t *testing.T) {
	observedCore, observedLogs := observer.New(zap.InfoLevel)
	tests := []struct {
		name    string
		opts    []etcdtest.Option
		op      func(ctx context.Context, cli *clientv3.Client) error // optional
		wantErr error                                                 // nil: op must succeed
		check   func(t *testing.T, c *etcdtest.Cluster)               // optional
	}{
		{
			name: "max txn ops exceeded",
			opts: []etcdtest.Option{etcdtest.WithMaxTxnOps(2)},
			op: func(ctx context.Context, cli *clientv3.Client) error {
				_, err := cli.Txn(ctx).Then(clientv3.OpPut("a", "1"), clientv3.OpPut("b", "2"), clientv3.OpPut("c", "3")).Commit()
				return err
			},
			wantErr: rpctypes.ErrTooManyOps,
		},
		{
			name: "max txn ops respected",
			opts: []etcdtest.Option{etcdtest.WithMaxTxnOps(2)},
			op: func(ctx context.Context, cli *clientv3.Client) error {
				_, err := cli.Txn(ctx).Then(clientv3.OpPut("a", "1"), clientv3.OpPut("b", "2")).Commit()
				return err
			},
		},
		{
			name: "max request bytes exceeded",
			opts: []etcdtest.Option{etcdtest.WithMaxRequestBytes(1024)},
			op: func(ctx context.Context, cli *clientv3.Client) error {
				_, err := cli.Put(ctx, "big", strings.Repeat("x", 4096))
				return err
			},
			wantErr: rpctypes.ErrRequestTooLarge,
		},
		{
			name: "max request bytes respected",
			opts: []etcdtest.Option{etcdtest.WithMaxRequestBytes(1024)},
			op: func(ctx context.Context, cli *clientv3.Client) error {
				_, err := cli.Put(ctx, "small", strings.Repeat("x", 512))
				return err
			},
		},
		{
			name: "auto compaction and raft timing",
			opts: []etcdtest.Option{
				etcdtest.WithAutoCompaction(embed.CompactorModeRevision, "1000"),
				etcdtest.WithRaftTiming(20*time.Millisecond, 200*time.Millisecond),
			},
			check: func(t *testing.T, c *etcdtest.Cluster) {
				cfg := c.Member(0).Config()
				assert.Equal(t, embed.CompactorModeRevision, cfg.AutoCompactionMode)
				assert.Equal(t, "1000", cfg.AutoCompactionRetention)
				assert.Equal(t, uint(20), cfg.TickMs)
				assert.Equal(t, uint(200), cfg.ElectionMs)
			},
		},
		{
			name: "config hook",
			opts: []etcdtest.Option{etcdtest.WithConfig(func(i int, cfg *embed.Config) {
				cfg.SnapshotCount = 1234 + uint64(i)
			})},
			check: func(t *testing.T, c *etcdtest.Cluster) {
				assert.Equal(t, uint64(1234), c.Member(0).Config().SnapshotCount)
			},
		},
		{
			name: "logger receives server logs",
			opts: []etcdtest.Option{etcdtest.WithLogger(zap.New(observedCore))},
			check: func(t *testing.T, c *etcdtest.Cluster) {
				assert.NotZero(t, observedLogs.FilterLoggerName("m0").Len())
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := etcdtest.Start(t, tt.opts...)
			if tt.check != nil {
				tt.check(t, c)
			}
			if tt.op == nil {
				return
			}
			err := tt.op(ctxTimeout(t, opTimeout), c.Client(t))
			if tt.wantErr == nil {
				require.NoError(t, err)
				return
			}
			require.Error(t, err)
			assert.Equal(t, tt.wantErr.Error(), rpctypes.ErrorDesc(err))
		})
	}
}

func TestInvalidOptions(t *testing.T) {
	tests := []struct {
		name string
		n    int
		opts []etcdtest.Option
	}{
		{"zero members", 0, nil},
		{"election shorter than 5 heartbeats", 1, []etcdtest.Option{etcdtest.WithRaftTiming(100*time.Millisecond, 200*time.Millisecond)}},
		{"unknown compaction mode", 1, []etcdtest.Option{etcdtest.WithAutoCompaction("sometimes", "1")}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := etcdtest.NewCluster(tt.n, tt.opts...)
			require.Error(t, err)
			require.Nil(t, c)
		})
	}
}

func TestSingleMemberStopRestart(t *testing.T) {
	c := etcdtest.Start(t)
	ep := c.Endpoint(0)
	put(t, c.Client(t), "k", "before")

	c.Stop(0)
	assert.Nil(t, c.Member(0))
	assert.Empty(t, c.Endpoints())
	assert.Equal(t, -1, c.Leader())
	c.Stop(0) // no-op

	require.NoError(t, c.Restart(0))
	require.Error(t, c.Restart(0), "restarting a running member")
	assert.Equal(t, []string{ep}, c.Endpoints(), "same port after restart")
	assert.Equal(t, 0, c.Leader())
	cli := c.Client(t)
	assert.Equal(t, "before", get(t, cli, "k"), "data kept across restart")
	put(t, cli, "k", "after")
	assert.Equal(t, "after", get(t, cli, "k"))
}

func TestRestartWaitsForBusyPort(t *testing.T) {
	c := etcdtest.Start(t)
	put(t, c.Client(t), "k", "v")
	c.Stop(0)

	// Someone else takes the member's client port for a while.
	u, err := url.Parse(c.Endpoint(0))
	require.NoError(t, err)
	l, err := net.Listen("tcp", u.Host)
	require.NoError(t, err)
	go func() {
		time.Sleep(300 * time.Millisecond)
		l.Close()
	}()

	require.NoError(t, c.Restart(0))
	assert.Equal(t, []string{c.Endpoint(0)}, c.Endpoints())
	assert.Equal(t, "v", get(t, c.Client(t), "k"))
}

func TestClusterReplication(t *testing.T) {
	c := etcdtest.StartCluster(t, 3)
	require.Equal(t, 3, c.N())
	require.Len(t, c.Endpoints(), 3)
	require.GreaterOrEqual(t, c.Leader(), 0)

	clients := make([]*clientv3.Client, c.N())
	for i := range clients {
		clients[i] = c.MemberClient(t, i)
	}
	for from := range clients {
		for to := range clients {
			if from == to {
				continue
			}
			key := "from-" + c.Endpoint(from) + "-to-" + c.Endpoint(to)
			put(t, clients[from], key, "v")
			// Reads are linearizable by default, so the write is visible
			// through any member right away.
			assert.Equal(t, "v", get(t, clients[to], key))
		}
	}
}

func TestClusterLeaderFailover(t *testing.T) {
	c := etcdtest.StartCluster(t, 3)
	put(t, c.Client(t), "k", "v1")

	old := c.Leader()
	require.GreaterOrEqual(t, old, 0)
	c.Stop(old)
	assert.Nil(t, c.Member(old))
	assert.Len(t, c.Endpoints(), 2)
	assert.NotContains(t, c.Endpoints(), c.Endpoint(old))

	leader, err := c.WaitLeader(ctxTimeout(t, opTimeout))
	require.NoError(t, err)
	assert.NotEqual(t, old, leader)

	cli := c.Client(t) // remaining endpoints only
	assert.Equal(t, "v1", get(t, cli, "k"))
	put(t, cli, "k", "v2")

	// The old leader catches up after a restart.
	require.NoError(t, c.Restart(old))
	assert.Len(t, c.Endpoints(), 3)
	assert.Equal(t, "v2", get(t, c.MemberClient(t, old), "k"))
}

func TestClusterQuorumLoss(t *testing.T) {
	c := etcdtest.StartCluster(t, 3)
	cli := c.Client(t) // all three endpoints
	put(t, cli, "k", "v1")

	// Stop two members, the leader among them, so that the survivor is a
	// follower that has lost its leader.
	leader := c.Leader()
	require.GreaterOrEqual(t, leader, 0)
	survivor := (leader + 1) % 3
	other := (leader + 2) % 3
	c.Stop(other)
	c.Stop(leader)
	require.Equal(t, []string{c.Endpoint(survivor)}, c.Endpoints())
	assert.Equal(t, -1, c.Leader())

	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	_, err := cli.Put(ctx, "k", "lost")
	cancel()
	require.Error(t, err, "write without quorum")
	t.Logf("write without quorum: %v (after %v)", err, time.Since(start).Round(time.Millisecond))
	assert.Less(t, time.Since(start), 5*time.Second)
	code := status.Code(err)
	// The server may also give up first, with its own "request timed out".
	assert.True(t, errors.Is(err, context.DeadlineExceeded) || code == codes.DeadlineExceeded || code == codes.Unavailable ||
		errors.Is(err, rpctypes.ErrTimeout), "unexpected error: %v", err)

	// The first restart restores the quorum: Restart waits until the member
	// is ready, hence until a leader exists.
	require.NoError(t, c.Restart(leader))
	_, err = c.WaitLeader(ctxTimeout(t, opTimeout))
	require.NoError(t, err)
	put(t, cli, "k", "v2")
	require.NoError(t, c.Restart(other))
	assert.Len(t, c.Endpoints(), 3)
	for i := range c.N() {
		assert.Equal(t, "v2", get(t, c.MemberClient(t, i), "k"), "member %d", i)
	}
}

func TestClusterRestartAll(t *testing.T) {
	c := etcdtest.StartCluster(t, 3)
	put(t, c.Client(t), "k", "v")
	for i := range c.N() {
		c.Stop(i)
	}
	require.Empty(t, c.Endpoints())
	// Without a majority Restart does not wait for readiness, so restarting
	// the members one by one works.
	for i := range c.N() {
		require.NoError(t, c.Restart(i))
	}
	_, err := c.WaitLeader(ctxTimeout(t, opTimeout))
	require.NoError(t, err)
	assert.Equal(t, "v", get(t, c.Client(t), "k"))
}

func TestCloseIdempotent(t *testing.T) {
	c, err := etcdtest.NewCluster(3)
	require.NoError(t, err)
	cli, err := clientv3.New(c.ClientConfig())
	require.NoError(t, err)
	_, err = cli.Put(ctxTimeout(t, opTimeout), "k", "v")
	require.NoError(t, err)
	require.NoError(t, cli.Close())
	c.Stop(1) // a stopped member is skipped by Close

	var wg sync.WaitGroup
	for range 3 {
		wg.Go(c.Close)
	}
	wg.Wait()
	c.Close()

	assert.Empty(t, c.Endpoints())
	assert.Equal(t, -1, c.Leader())
	for i := range c.N() {
		assert.Nil(t, c.Member(i))
		c.Stop(i) // no-op
		assert.ErrorIs(t, c.Restart(i), etcdtest.ErrClosed)
	}
}
