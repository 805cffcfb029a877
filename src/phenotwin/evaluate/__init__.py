"""Checking models and translations (`phenotwin evaluate`, the Evaluate model widget).

memorization: generalises or memorises (two models on disjoint halves, Phen-LDiff Fig. 4);
translation: flip rate, reconstruction PSNR/SSIM, FID/KID, synthetic ground truth;
metrics, classifier: the measurements; report: plots, verdicts and report files.
"""
