/* The invariant networks' chain rule, point by point: features y (I1 - 3, I2 - 3, J - 1, then per fibre family a:
 * I4 - 1, K4 - 1, <I4 - 1>^2) of the 3D F (F33 = 1 in plane strain), their derivatives dy = dy/dF, and from the
 * network's feature-space gradient Wy and Hessian H the stress P = sum_a Wy_a dy_a and the tangent
 *
 *     A_iJkL = sum_ab H_ab dy_a,iJ dy_b,kL + sum_a Wy_a d2y_a/dF_iJ dF_kL
 *
 * with the second derivatives of fe2ml/surrogate/closed_form.py (module docstring and _invariant_form):
 *     d2I1 = 2 d_ik d_JL,
 *     d2I2 = 2 (2 F_iJ F_kL + I1 d_ik d_JL - d_ik C_JL - F_iL F_kJ - b_ik d_JL),
 *     d2J  = e_ikm e_JLN F_mN,
 *     d2I4 = 2 d_ik a_J a_L,
 *     d2K4 = 2 sum_i' dg_i',iJ dg_i',kL + 2 Eg_ik B_JL   (g = cof F a, B_QS = e_JQS a_J, Eg_pr = e_ipr g_i),
 *     d2M  = 2 H(I4 - 1) dI4 (x) dI4 + 2 <I4 - 1> d2I4.
 * Row-major arrays throughout; F (n, d, d), a (K, 3), y (n, r), dy (n, r, 9), Wy (n, r), H (n, r, r),
 * P (n, d, d), A (n, d, d, d, d), r = 3 + 3 K. */

#include <string.h>

#define MAX_FAMILIES 8
#define MAX_R (3 + 3 * MAX_FAMILIES)

static int eps(int i, int j, int k) { return ((i - j) * (j - k) * (k - i)) / 2; }

typedef struct {
    double F[9], C[9], b[9], I1;
    double pos[MAX_FAMILIES], mac[MAX_FAMILIES];
    double Eg[MAX_FAMILIES][9], B[MAX_FAMILIES][9], dg[MAX_FAMILIES][27];
} point_t;

static void embed(int d, const double *F, double *F3) {
    if (d == 3) {
        memcpy(F3, F, 9 * sizeof(double));
        return;
    }
    F3[0] = F[0]; F3[1] = F[1]; F3[2] = 0.0;
    F3[3] = F[2]; F3[4] = F[3]; F3[5] = 0.0;
    F3[6] = 0.0;  F3[7] = 0.0;  F3[8] = 1.0;
}

/* y (r) and dy (r x 9) at F (d x d); what the tangent needs besides them into pt */
static void features(int d, int K, const double *Fin, const double *a, double *y, double *dy, point_t *pt) {
    double *F = pt->F, *C = pt->C, *b = pt->b;
    double cof[9], FC[9];
    embed(d, Fin, F);
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 3; j++) {
            double c = 0.0, bb = 0.0;
            for (int m = 0; m < 3; m++) {
                c += F[3 * m + i] * F[3 * m + j];
                bb += F[3 * i + m] * F[3 * j + m];
            }
            C[3 * i + j] = c;
            b[3 * i + j] = bb;
            cof[3 * i + j] = F[3 * ((i + 1) % 3) + (j + 1) % 3] * F[3 * ((i + 2) % 3) + (j + 2) % 3]
                           - F[3 * ((i + 1) % 3) + (j + 2) % 3] * F[3 * ((i + 2) % 3) + (j + 1) % 3];
        }
    double I1 = C[0] + C[4] + C[8], CC = 0.0;
    for (int m = 0; m < 9; m++) CC += C[m] * C[m];
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 3; j++) {
            double s = 0.0;
            for (int m = 0; m < 3; m++) s += F[3 * i + m] * C[3 * m + j];
            FC[3 * i + j] = s;
        }
    double J = F[0] * cof[0] + F[1] * cof[1] + F[2] * cof[2];
    pt->I1 = I1;
    y[0] = I1 - 3.0;
    y[1] = 0.5 * (I1 * I1 - CC) - 3.0;
    y[2] = J - 1.0;
    for (int m = 0; m < 9; m++) {
        dy[m] = 2.0 * F[m];
        dy[9 + m] = 2.0 * (I1 * F[m] - FC[m]);
        dy[18 + m] = cof[m];
    }
    for (int k = 0; k < K; k++) {
        const double *ak = a + 3 * k;
        double Fa[3], g[3], T[9];
        double *B = pt->B[k], *Eg = pt->Eg[k], *dg = pt->dg[k];
        double *y4 = y + 3 + 3 * k, *d4 = dy + 9 * (3 + 3 * k);
        for (int i = 0; i < 3; i++) {
            Fa[i] = F[3 * i] * ak[0] + F[3 * i + 1] * ak[1] + F[3 * i + 2] * ak[2];
            g[i] = cof[3 * i] * ak[0] + cof[3 * i + 1] * ak[1] + cof[3 * i + 2] * ak[2];
        }
        for (int q = 0; q < 3; q++)
            for (int s = 0; s < 3; s++) {
                double v = 0.0;
                for (int j = 0; j < 3; j++) v += eps(j, q, s) * ak[j];
                B[3 * q + s] = v;
            }
        for (int l = 0; l < 3; l++)  /* T = F B^T */
            for (int q = 0; q < 3; q++)
                T[3 * l + q] = F[3 * l] * B[3 * q] + F[3 * l + 1] * B[3 * q + 1] + F[3 * l + 2] * B[3 * q + 2];
        for (int p = 0; p < 3; p++)
            for (int l = 0; l < 3; l++)
                Eg[3 * p + l] = eps(0, p, l) * g[0] + eps(1, p, l) * g[1] + eps(2, p, l) * g[2];
        for (int i = 0; i < 3; i++)  /* dg_i,pQ = e_ipl T_lQ */
            for (int p = 0; p < 3; p++)
                for (int q = 0; q < 3; q++) {
                    double v = 0.0;
                    for (int l = 0; l < 3; l++) v += eps(i, p, l) * T[3 * l + q];
                    dg[9 * i + 3 * p + q] = v;
                }
        double I4 = Fa[0] * Fa[0] + Fa[1] * Fa[1] + Fa[2] * Fa[2], x = I4 - 1.0;
        double pos = x > 0.0 ? 1.0 : 0.0, mac = x * pos;
        pt->pos[k] = pos;
        pt->mac[k] = mac;
        y4[0] = x;
        y4[1] = g[0] * g[0] + g[1] * g[1] + g[2] * g[2] - 1.0;
        y4[2] = mac * mac;
        for (int p = 0; p < 3; p++)
            for (int q = 0; q < 3; q++) {
                double dI4 = 2.0 * Fa[p] * ak[q], dK4 = 0.0;
                for (int i = 0; i < 3; i++) dK4 += g[i] * dg[9 * i + 3 * p + q];
                d4[3 * p + q] = dI4;
                d4[9 + 3 * p + q] = 2.0 * dK4;
                d4[18 + 3 * p + q] = 2.0 * mac * dI4;
            }
    }
}

/* the 36 nonzero e_ikm e_JLN F_mN (i != k, J != L): entry (3 i + J) 9 + 3 k + L of A, the sign and mN */
static int EPS_PQ[36], EPS_MN[36];
static double EPS_SIGN[36];

static void init_tables(void) {
    int t = 0;
    for (int i = 0; i < 3; i++)
        for (int J = 0; J < 3; J++)
            for (int k = 0; k < 3; k++)
                for (int L = 0; L < 3; L++)
                    if (i != k && J != L) {
                        int m = 3 - i - k, N = 3 - J - L;
                        EPS_PQ[t] = 9 * (3 * i + J) + 3 * k + L;
                        EPS_MN[t] = 3 * m + N;
                        EPS_SIGN[t] = eps(i, k, m) * eps(J, L, N);
                        t++;
                    }
}

int fe2ml_max_families(void) { return MAX_FAMILIES; }

void fe2ml_invariant_features(long n, int d, int K, const double *F, const double *a, double *y, double *dy) {
    int r = 3 + 3 * K;
    point_t pt;
    for (long e = 0; e < n; e++)
        features(d, K, F + e * d * d, a, y + e * r, dy + e * r * 9, &pt);
}

void fe2ml_invariant_tangent(long n, int d, int K, const double *F, const double *a, const double *Wy,
                             const double *H, double *P, double *A) {
    int r = 3 + 3 * K, R = r + 3 * K;
    point_t pt;
    /* D: the rows dy and, per family, the three rows dg_i of dK4's first term; Hd = Hm D with Hm the Hessian H
     * bordered by 2 W_K4 on the dg rows, with the terms that are outer products of rows folded in:
     * 4 W_I2 F_iJ F_kL = W_I2 dI1 (x) dI1 and 2 H(I4 - 1) W_M dI4 (x) dI4 */
    double y[MAX_R], D[(MAX_R + 3 * MAX_FAMILIES) * 9], Hd[(MAX_R + 3 * MAX_FAMILIES) * 9], A3[81], P3[9];
    double G[9];
    init_tables();
    for (long e = 0; e < n; e++) {
        const double *W = Wy + e * r, *He = H + e * r * r;
        features(d, K, F + e * d * d, a, y, D, &pt);
        const double *F3 = pt.F, *C = pt.C, *b = pt.b;
        for (int f = 0; f < K; f++)
            memcpy(D + 9 * (r + 3 * f), pt.dg[f], 27 * sizeof(double));
        /* sums over an outer index with independent accumulators inside (no chain of dependent additions) */
        for (int s = 0; s < r; s++) {
            double *h = Hd + 9 * s;
            for (int m = 0; m < 9; m++) h[m] = 0.0;
            for (int t = 0; t < r; t++) {
                double c = He[s * r + t];
                for (int m = 0; m < 9; m++) h[m] += c * D[t * 9 + m];
            }
        }
        for (int m = 0; m < 9; m++) Hd[m] += W[1] * D[m];
        for (int f = 0; f < K; f++) {
            int s4 = 3 + 3 * f;
            double c = 2.0 * pt.pos[f] * W[5 + 3 * f], w5 = 2.0 * W[4 + 3 * f];
            for (int m = 0; m < 9; m++) Hd[s4 * 9 + m] += c * D[s4 * 9 + m];
            for (int m = 0; m < 27; m++) Hd[(r + 3 * f) * 9 + m] = w5 * D[(r + 3 * f) * 9 + m];
        }
        for (int m = 0; m < 9; m++) P3[m] = 0.0;
        for (int s = 0; s < r; s++)
            for (int m = 0; m < 9; m++) P3[m] += W[s] * D[s * 9 + m];
        /* d_ik G_JL: 2 W_I1 d_JL + 2 W_I2 (I1 d_JL - C_JL) + sum_f 2 (W_I4 + 2 <I4 - 1> W_M) a_J a_L */
        double w1 = 2.0 * W[1], w2 = W[2];
        for (int J = 0; J < 3; J++)
            for (int L = 0; L < 3; L++) {
                double v = -w1 * C[3 * J + L] + (J == L ? 2.0 * W[0] + w1 * pt.I1 : 0.0);
                for (int f = 0; f < K; f++)
                    v += 2.0 * (W[3 + 3 * f] + 2.0 * pt.mac[f] * W[5 + 3 * f]) * a[3 * f + J] * a[3 * f + L];
                G[3 * J + L] = v;
            }
        /* sum_st D_sp Hm_st D_tq for all (p, q) */
        for (int p = 0; p < 9; p++) {
            double acc[9] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
            for (int s = 0; s < R; s++) {
                double c = D[s * 9 + p];
                for (int q = 0; q < 9; q++) acc[q] += c * Hd[s * 9 + q];
            }
            for (int q = 0; q < 9; q++) A3[9 * p + q] = acc[q];
        }
        /* - 2 W_I2 F_iL F_kJ, then the terms with a Kronecker delta, e_ikm e_JLN F_mN and per family 2 W_K4 Eg_ik B_JL */
        for (int i = 0; i < 3; i++)
            for (int J = 0; J < 3; J++)
                for (int k = 0; k < 3; k++) {
                    double c = -w1 * F3[3 * k + J], *row = A3 + 9 * (3 * i + J) + 3 * k;
                    for (int L = 0; L < 3; L++) row[L] += c * F3[3 * i + L];
                }
        for (int i = 0; i < 3; i++)
            for (int J = 0; J < 3; J++) {
                double *row = A3 + 9 * (3 * i + J);
                for (int L = 0; L < 3; L++) row[3 * i + L] += G[3 * J + L];
                for (int k = 0; k < 3; k++) row[3 * k + J] -= w1 * b[3 * i + k];
            }
        for (int t = 0; t < 36; t++) A3[EPS_PQ[t]] += w2 * EPS_SIGN[t] * F3[EPS_MN[t]];
        for (int f = 0; f < K; f++) {
            double wK = 2.0 * W[4 + 3 * f];
            const double *Eg = pt.Eg[f], *Bf = pt.B[f];
            for (int i = 0; i < 3; i++)
                for (int k = 0; k < 3; k++) {
                    double c = wK * Eg[3 * i + k];
                    for (int J = 0; J < 3; J++)
                        for (int L = 0; L < 3; L++) A3[9 * (3 * i + J) + 3 * k + L] += c * Bf[3 * J + L];
                }
        }
        if (d == 3) {
            memcpy(P + 9 * e, P3, 9 * sizeof(double));
            memcpy(A + 81 * e, A3, 81 * sizeof(double));
        } else {
            double *Pe = P + 4 * e, *Ae = A + 16 * e;
            for (int i = 0; i < 2; i++)
                for (int J = 0; J < 2; J++) {
                    Pe[2 * i + J] = P3[3 * i + J];
                    for (int k = 0; k < 2; k++)
                        for (int L = 0; L < 2; L++)
                            Ae[8 * i + 4 * J + 2 * k + L] = A3[9 * (3 * i + J) + 3 * k + L];
                }
        }
    }
}

